"""Every key the package logs, in one place: the callback writes them, the report and its
plots read them. Rows are logged where Lightning logs its own metrics of the same weights
(``_logging.LogPosition``; see ``docs/configuration.md``)."""

from __future__ import annotations

FLATNESS_PREFIX = "flatness/"
# The callback's bookkeeping: its hyperparameters (flatness_callback/<option>) and the scalars below.
CALLBACK_PREFIX = "flatness_callback/"
# Logged with every row: Lightning's epoch index of the weights (-1: initialization), as Lightning
# logs it with its own metrics, and the callback's x, epochs completed (0: initialization).
EPOCH = "epoch"
EPOCHS_COMPLETED = "flatness_callback/epochs_completed"
GAP_PREFIX = "gap/"
LANDSCAPE_PREFIX = "landscape/"

# Flatness metrics (one value per measurement).
HESSIAN_TOP_EIG = "flatness/hessian_top_eig"
GRAD_COSINE_REGRET = "flatness/grad_cosine_regret"
GRAD_COSINE = "flatness/grad_cosine"
FISHER_TRACE = "flatness/fisher_trace"
PACGEN = "flatness/pacgen"
# Fraction of coordinates whose PACGen curvature factor is above its 1/N_i floor (0: Psi measures only |w|).
PACGEN_CURVED_FRACTION = "flatness/pacgen_curved_fraction"
LOCAL_ENTROPY = "flatness/local_entropy"
# The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), the critical batch size estimate.
GRAD_NOISE_SCALE = "flatness/grad_noise_scale"
SECONDS = "flatness/seconds"
ADAPTIVE_SHARPNESS = "flatness/adaptive_sharpness"
FISHER_RAO_NORM = "flatness/fisher_rao_norm"

# The ratio of flatnesses (FlatnessRatio, opt-in; F. Huszár, inference.vc blog): the mini-batch losses' mean top
# Hessian eigenvalue Σ_b w_b λ_max(H_b), and its ratio to the mean loss's λ_max(H) (≥ 1).
FLATNESS_RATIO = "flatness/flatness_ratio"
BATCH_TOP_EIG_MEAN = "flatness/batch_top_eig_mean"

# Both ends of the Hessian's spectrum (HessianMinEigenvalue, opt-in; Li et al. 2018): the most negative
# eigenvalue and |λ_min/λ_max| = max(−λ_min, 0)/λ_max (0 where the Hessian is positive semi-definite).
HESSIAN_MIN_EIG = "flatness/hessian_min_eig"
HESSIAN_EIG_RATIO = "flatness/hessian_eig_ratio"


def se(key: str) -> str:
    """The standard error logged next to ``key``: ``<key>_se`` (e.g. ``flatness/hessian_top_eig_se``)."""
    return f"{key}_se"


def hessian_eig(j: int) -> str:
    """The ``j``-th largest Hessian eigenvalue, ``j = 1..k`` (logged when ``k > 1``)."""
    return f"flatness/hessian_eig_{j}"


def hessian_top_eig_block(name: str) -> str:
    """The top eigenvalue of the Hessian's diagonal block ``name`` (:class:`~lightning_flatness.metrics.BlockCurvature`)."""
    return f"{HESSIAN_TOP_EIG}/{name}"


def hessian_trace_block(name: str) -> str:
    """The trace of the Hessian's diagonal block ``name`` (:class:`~lightning_flatness.metrics.BlockCurvature`)."""
    return f"flatness/hessian_trace/{name}"


# The train/test gap: eval-mode loss and accuracy on fixed subsamples.
TRAIN_LOSS = "gap/train_loss"
TEST_LOSS = "gap/test_loss"
LOSS_GAP = "gap/loss"  # test - train
TRAIN_ACC = "gap/train_acc"
TEST_ACC = "gap/test_acc"
ACC_GAP = "gap/acc"  # train - test


def split_loss(split: str) -> str:
    """``gap/train_loss`` or ``gap/test_loss``."""
    return f"gap/{split}_loss"


def split_acc(split: str) -> str:
    """``gap/train_acc`` or ``gap/test_acc``."""
    return f"gap/{split}_acc"


# Robustness to adversaries on the gap's held-out subsample (AdversarialRobustness): per attack "fgsm", "pgd".
ROBUST_PREFIX = "robust/"


def robust_keys(attack: str) -> tuple[str, str, str]:
    """``robust/{attack}_acc``, ``robust/{attack}_loss``, ``robust/{attack}_drop`` (clean − attacked accuracy)."""
    return f"{ROBUST_PREFIX}{attack}_acc", f"{ROBUST_PREFIX}{attack}_loss", f"{ROBUST_PREFIX}{attack}_drop"


# Loss-landscape images.
LANDSCAPE_1D = "landscape/1d"
LANDSCAPE_2D = "landscape/2d"
LANDSCAPE_EIGENVECTOR = "landscape/eigenvector"

# The sizes behind the standard errors, logged once with the first row of a fit: how many samples
# each subsample holds as drawn (all of a split smaller than asked), and the size of each data
# set (when it has one), so the report's sample-size guide uses what was measured, not what was asked.
SUBSAMPLES = ("measure", "gap_train", "gap_val")  # the measurement subsample, the gap's two


def drawn_samples(part: str) -> str:
    """``flatness_callback/samples/<part>``: the samples the subsample ``part`` (of :data:`SUBSAMPLES`) holds."""
    return f"{CALLBACK_PREFIX}samples/{part}"


def dataset_size(split: str) -> str:
    """``flatness_callback/dataset_size/<split>``: the samples of the ``"train"`` or ``"val"`` data set."""
    return f"{CALLBACK_PREFIX}dataset_size/{split}"


def subsample_of(key: str) -> str:
    """The subsample ``key`` is measured on: the gap's train or validation one, else the measurement subsample."""
    if key in (TRAIN_LOSS, TRAIN_ACC):
        return "gap_train"
    if key in (TEST_LOSS, TEST_ACC) or key.startswith(ROBUST_PREFIX):
        return "gap_val"
    return "measure"


def split_of(part: str, source: str = "train") -> str:
    """The data set (``"train"`` or ``"val"``) the subsample ``part`` is drawn from; ``source``: the callback's."""
    return {"gap_train": "train", "gap_val": "val"}.get(part, source)


# Keys logged without a `_se`: they are not estimates over the subsample's draw (a wall time; the
# fraction of coordinates leaving PACGen's floor, a count at this measurement's estimates).
NO_SE = (PACGEN_CURVED_FRACTION, SECONDS)

# Keys whose relative standard error the callback watches (it warns once above RELATIVE_SE_WARNING):
# positive by construction, so se / value is meaningful (unlike a cosine or a gap near 0).
RELATIVE_SE_KEYS = (HESSIAN_TOP_EIG, GRAD_COSINE_REGRET, FISHER_TRACE, TRAIN_LOSS, TEST_LOSS)
RELATIVE_SE_WARNING = 0.2
RELATIVE_SE_TARGET = 0.05  # the sample-size guide: samples for a relative standard error under 5%

# The report's row order, and the panels of its overview figure.
REPORT_ORDER = (
    HESSIAN_TOP_EIG, HESSIAN_MIN_EIG, HESSIAN_EIG_RATIO, FLATNESS_RATIO, BATCH_TOP_EIG_MEAN, GRAD_COSINE_REGRET, GRAD_COSINE, FISHER_TRACE, PACGEN, PACGEN_CURVED_FRACTION,
    ADAPTIVE_SHARPNESS, FISHER_RAO_NORM, GRAD_NOISE_SCALE, TRAIN_LOSS, TEST_LOSS, LOSS_GAP,
    TRAIN_ACC, TEST_ACC, ACC_GAP, *robust_keys("fgsm"), *robust_keys("pgd"), SECONDS,
)  # fmt: skip
OVERVIEW = (HESSIAN_TOP_EIG, GRAD_COSINE_REGRET, FISHER_TRACE, PACGEN, LOSS_GAP, ACC_GAP)

# The Hessian's eigenvalue density (stochastic Lanczos quadrature; HessianDensity, opt-in).
HESSIAN_DENSITY_NEGATIVE_MASS = "flatness/hessian_density_negative_mass"  # mass below -negative_threshold * max|λ|
HESSIAN_TRACE_SLQ = "flatness/hessian_trace_slq"  # tr ∇²L from the same probes
HESSIAN_DENSITY_IMAGE = "hessian_density/density"  # the smoothed density, an image (log y)
HESSIAN_DENSITY_HISTOGRAM = "hessian_density/eigenvalues"  # estimated eigenvalue counts, a histogram
