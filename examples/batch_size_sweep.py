"""The batch-size study in one command: same MLP, SGD at lr 0.1, batch sizes 16 64 256 1024.

    python examples/batch_size_sweep.py                 # one seed: ~5.5 minutes of CPU time, offline
    python examples/batch_size_sweep.py --seeds 3       # three seeds: means, 95% intervals, bands (~3x as long)
    python examples/batch_size_sweep.py --lr-sweep      # batch size 256, lr 0.01 0.03 0.1 0.3
    python examples/batch_size_sweep.py --data digits --batch-sizes 16 256 --wandb
    tensorboard --logdir runs/batch_size_sweep          # the curves, x-axis = epoch

Each run trains until its loss on the whole training set is <= --target-train-loss (0.05) so the
runs are compared at matched training loss; FlatnessCallback logs the flatness metrics and the
train/test gap to TensorBoard (and W&B with --wandb). At the end the report
(``lightning-flatness report runs/batch_size_sweep``) writes plots and a table with the rank
correlation of every metric with the generalization gap to runs/batch_size_sweep/report/ (with
--seeds N: means and 95% intervals over seeds, bootstrap intervals on the correlations, and which
of them the data resolve), and how many measurement samples each metric would need for a 5%
relative standard error.
This script is ``lightning-flatness sweep``; the code lives in ``lightning_flatness.study.sweep``.
"""

from lightning_flatness.study.sweep import main

if __name__ == "__main__":
    main()
