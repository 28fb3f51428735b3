"""Models: the model sources (torchvision, timm), backbones and their preprocessing, heads,
surgery, selectors, and the builder that assembles backbone -> head -> surgery."""
