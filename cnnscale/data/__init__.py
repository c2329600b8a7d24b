"""Data: CIFAR-10, ImageFolder and synthetic sets (datasets), the device-resident loader with batched augmentation
(device), and the choice between it and the torch DataLoader for a run (loaders)."""

__all__: list[str] = []
