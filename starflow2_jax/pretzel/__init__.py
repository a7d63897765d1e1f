"""STARFlow2 / Pretzel: a frozen Qwen2.5-VL text stream and a deep-flow stream under one causal mask."""
