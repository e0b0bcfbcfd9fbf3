"""Checkpoints in and out: checkpoint.py (a path to config, params and tokenizer), gguf_file.py and gguf_write.py
(llama.cpp's GGUF, read and written), hf.py (Hugging Face safetensors directories), materialize.py (tensor by tensor
onto the device), tokenizer.py and chat_template.py, llamacpp.py (llama.cpp as a reference implementation, in a
child process)."""
