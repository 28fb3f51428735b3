"""Data: the data formats table and its readers, splits, transforms, the image decoder, the
decoded-image cache, MixUp/CutMix, and the Lightning datamodule."""
