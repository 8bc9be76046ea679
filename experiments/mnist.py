"""Train and certify on mnist: `python -m experiments.mnist --config=experiments/configs/mnist.py`."""

from experiments import train_main

if __name__ == "__main__":
  train_main.run("runs/mnist")
