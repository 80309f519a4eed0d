"""Pieces shared by the optimizers: the closure prologue (`closure`), typed string options (`choices`), cache
tiling of element-wise foreach chains (`foreach_tiles`), the Lion/AdamW updates run by matrix optimizers on their
scalar parameters (`scalar_updates`), `CompositeOptimizer` (`composite`), the training-loop hook protocol
(`hooks`) and DTensor helpers (`tensors`)."""
