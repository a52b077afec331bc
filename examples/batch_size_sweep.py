"""The batch-size study in one command: same MLP, SGD at lr 0.1, batch sizes 16 64 256 1024.

    python examples/batch_size_sweep.py                 # ~5 minutes on 2 CPU cores, offline
    python examples/batch_size_sweep.py --lr-sweep      # batch size 256, lr 0.01 0.03 0.1 0.3
    python examples/batch_size_sweep.py --data digits --batch-sizes 16 256 --wandb
    tensorboard --logdir runs/batch_size_sweep          # the curves, x-axis = epoch

Each run trains until its loss on the whole training set is <= --target-train-loss (0.05) so the
runs are compared at matched training loss; FlatnessCallback logs the flatness metrics and the
train/test gap to TensorBoard (and W&B with --wandb). At the end the report
(``lightning-flatness report runs/batch_size_sweep``) writes plots and a table with the rank
correlation of every metric with the generalization gap to runs/batch_size_sweep/report/.
This script is ``lightning-flatness sweep``; the code lives in ``lightning_flatness.study.sweep``.
"""

from lightning_flatness.study.sweep import main

if __name__ == "__main__":
    main()
