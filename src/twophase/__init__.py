"""twophase: transfer learning then fine-tuning as a DVC pipeline."""
