"""Reading and writing models: HF safetensors folders, HF GPTQ checkpoints, qjax checkpoints, texts and the shared
assets."""
