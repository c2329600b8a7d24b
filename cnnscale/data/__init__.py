"""Data: CIFAR-10, ImageFolder and synthetic sets (datasets), ImageFolder files that name themselves (images), the
decode cache shared by runs (cache), the device-resident loader with batched augmentation (device), what the machine
can hold (fits), and the choice between the device loader and the torch DataLoader for a run (loaders)."""

__all__: list[str] = []
