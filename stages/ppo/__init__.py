"""stages.ppo."""
