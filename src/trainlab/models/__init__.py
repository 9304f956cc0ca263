"""Networks: the course's own (cnn, mlp) and, later, library zoos."""
