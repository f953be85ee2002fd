"""Parts that belong to training methods (not to the shared trainer): composed by the recipe scripts."""
