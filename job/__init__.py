"""cnn-job: batch training of CNN recipes on MNIST and CIFAR-10, one GPU or many."""
