"""Train and certify on cifar10: `python -m experiments.cifar10 --config=experiments/configs/cifar.py`."""

from experiments import train_main

if __name__ == "__main__":
  train_main.run("runs/cifar10")
