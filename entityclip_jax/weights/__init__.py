"""Weight files of other programs: Hugging Face CLIPModel, OpenAI / EntityCLIP-release state dicts, TorchScript."""
