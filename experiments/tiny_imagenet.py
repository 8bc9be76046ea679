"""Train and certify on tiny_imagenet: `python -m experiments.tiny_imagenet --config=experiments/configs/tiny_imagenet.py`."""

from experiments import train_main

if __name__ == "__main__":
  train_main.run("runs/tiny_imagenet")
