"""tasks.data: images (decode, the one check), the index (scan, table, labels), the input pipeline, augmentation
policy and the resampler."""
