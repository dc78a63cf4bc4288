"""Architecture and math only: the CLIP towers (Hugging Face names), MMAE experts, GI-ITM gates and heads."""
