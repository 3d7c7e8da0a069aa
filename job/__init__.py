"""cnn-job: batch training of the seed CNNs."""
