"""llama.cpp's GGUF format: import (`gguf_read`) and direct export (`gguf_write`)."""
