"""Layer 2, the ML runtime: models and peft adapters, data, local training, tasks (never Flower)."""
