"""Every default of the toolkit. Each UPPER_CASE name below is a command-line flag of
train.py (GEN_* names are flags of generate_images.py, without the prefix): DATA_ROOT is
--data-root, CONDITIONAL is --conditional/--no-conditional. The comment on each line is
the flag's --help text. Presets (bottom) override these; flags override presets."""

# --- data -----------------------------------------------------------------------------
DATA_ROOT = "data/AD_NC"  # image folder: AD_NC/{train,test}/{AD,NC}, class sub-folders, or a flat folder
DEMO_ROOT = "data/demo/AD_NC"  # where the built-in demo set (from the MNI152 brain template) is built on first use
DEMO_ATROPHY = 1.0  # strength of the simulated atrophy of the demo set's AD class (0: none)
DEMO = dict(subjects=(60, 15), slices_per_subject=20, seed=0)  # the demo set: subjects per class (train, test)
DATA_SPLITS = "train"  # comma list of split sub-folders of DATA_ROOT to use when they exist, e.g. train,test
RESOLUTION = 256  # training resolution, a power of two from 32 to 1024
IMAGE_MODE = "L"  # L (grayscale, 1 channel) or RGB (3 channels); the model's channels follow
RESIZE_MODE = "pad"  # pad: pad to square then resize (keeps the anatomy); resize: stretch to square
HFLIP = True  # random horizontal (left-right) flips of real images
VFLIP = False  # random vertical flips of real images
ROTATE = 0.0  # random rotation of real images by up to +-ROTATE degrees (e.g. 10)
JITTER = 0.0  # brightness and contrast jitter of real images: factors in [1 - JITTER, 1 + JITTER]
SLICE_RANGE = (0.0, 1.0)  # NIfTI volumes: axial slices from LO to HI (fractions of the height) that contain brain
SKIP_BAD_IMAGES = False  # skip and count unreadable images instead of stopping
LOAD_THREADS = 2  # threads that decode images into the in-memory cache at start

# --- model ----------------------------------------------------------------------------
Z_DIM = 256  # latent z size
W_DIM = 256  # style w size
MAPPING_LAYERS = 8  # fully connected layers in the mapping network
MAPPING_LR_MULT = 0.01  # learning-rate multiplier of the mapping network
CHANNEL_BASE = 16384  # feature maps at resolution r are min(CHANNEL_BASE // r, CHANNEL_MAX)
CHANNEL_MAX = 256  # most feature maps in any layer
CHANNEL_MIN = 0  # fewest feature maps in any layer (0: no floor; e.g. 16 keeps the highest resolutions wide enough)
CONDITIONAL = False  # condition G (class embedding) and D (projection) on the class label
MBSTD_GROUP = 4  # minibatch standard-deviation group size in D
STYLE_MIXING_PROB = 0.9  # probability of mixing two latents in a training batch
W_AVG_BETA = 0.995  # decay of the tracked mean w used by truncation
SPECTRAL_NORM = False  # spectral normalisation of every D layer
STYLE_OP = "modconv"  # how w styles each synthesis layer: modconv (StyleGAN2) | adain (StyleGAN's AdaIN)
ATTENTION_RES = 0  # resolution of a self-attention block in G and D, a power of two from 8 (0: none)
RESAMPLE = "bilinear"  # 2x resampling: bilinear (D convolves after down-sampling) | upfirdn (StyleGAN2's own)
CONV_CLAMP = 0.0  # limit every layer's activated output to +-CONV_CLAMP (0: none; StyleGAN2-ADA's networks use 256)
SCANNER_NOISE = False  # G's slices get Rician noise on the brain's pixels at the training slices' measured levels

# --- training -------------------------------------------------------------------------
OUT_DIR = "."  # Models/ and saved_examples/ are created under this folder
BATCH_SIZE = 32  # images per iteration (global, across all processes)
EPOCHS = 150  # passes over the training set
MAX_STEPS = 0  # stop after this many iterations in total (0: no limit)
KIMG = 0.0  # run length in thousands of real images shown to D; overrides EPOCHS (0: EPOCHS decides)
SNAPSHOT_KIMG = 0.0  # every this many kimg: checkpoint, grid fakes_KKKKKK.png, evaluation (0: by epochs, *_EVERY)
TICK_KIMG = 4.0  # every this many kimg: one line of training statistics in OUT_DIR/stats.jsonl
G_LR = 0.002  # generator Adam learning rate
D_LR = 0.002  # discriminator Adam learning rate
ADAM_BETAS = (0.0, 0.99)  # Adam beta1,beta2
LR_SCHEDULE = "constant"  # constant | cyclic (triangular) | step (decay every LR_STEP_EPOCHS)
LR_CYCLE_STEPS = 2000  # cyclic: iterations from the low to the high learning rate
LR_CYCLE_MIN = 0.1  # cyclic: lowest learning rate as a fraction of G_LR / D_LR
LR_STEP_EPOCHS = 100  # step: epochs between learning-rate decays
LR_STEP_FACTOR = 0.1  # step: factor applied at each decay
LOSS = "wgan-gp"  # wgan-gp (critic with gradient penalty and drift) | logistic (non-saturating, R1)
GP_LAMBDA = 10.0  # WGAN-GP gradient-penalty weight
DRIFT = 0.001  # WGAN-GP drift penalty on real scores
R1_GAMMA = 10.0  # logistic: R1 penalty weight
R1_GAMMA_RES = 0  # R1's weight is R1_GAMMA at this resolution and scales with R1_GAMMA_POWER (progressive; 0: fixed)
R1_GAMMA_POWER = 2.0  # with R1_GAMMA_RES: the weight goes as (resolution / R1_GAMMA_RES) ** this (< 0: weaker above)
WGAN_R1_GAMMA = 0.0  # wgan-gp: weight of an R1 penalty on real images added to the gradient penalty (e.g. 0.002)
D_REG_INTERVAL = 4  # iterations between D penalties (GP or R1), applied with gain equal to the interval
PL_WEIGHT = 2.0  # path-length penalty weight (0: off)
PL_INTERVAL = 16  # iterations between path-length penalties, applied with gain equal to the interval
PL_DECAY = 0.01  # decay of the running mean path length
PL_BATCH_SHRINK = 2  # the path-length penalty uses BATCH_SIZE // PL_BATCH_SHRINK images
MODE_SEEKING = 0.0  # mode-seeking weight (Mao et al. 2019): G pays for latent pairs with alike 16x16 images (0: off)
MODE_SEEKING_FULL = -1.0  # mode-seeking weight at full resolution, after any --progressive growth (-1: MODE_SEEKING)
EMA_KIMG = 10.0  # half-life of the generator's moving average, in thousands of images
EMA_RAMPUP = 0.05  # EMA half-life is at most this fraction of the images seen so far (0: off)
SEED = 0  # seed of every random choice: same seed, same run
INIT_FROM = ""  # start from this network (checkpoint, NVlabs pickle, rosinality); a lower-res one grows (--progressive)
FREEZE_D = 0  # keep D's from-image layer and its N highest-resolution blocks fixed (FreezeD, Mo et al. 2020)
DEVICE = "auto"  # auto (CUDA when present) | cpu | cuda
SAMPLE_EVERY = 2  # epochs between sample grids from fixed latents
SAMPLE_COUNT = 16  # images in each sample grid
CHECKPOINT_EVERY = 4  # epochs between checkpoints
KEEP_CHECKPOINTS = 3  # newest checkpoints kept in Models/ (0: keep all)
EVAL_EVERY = 4  # epochs between evaluations (SWD, MS-SSIM, precision/recall, FID/KID) and at the end (0: off)
EVAL_N = 1000  # generated and real images in each evaluation
EVAL_METRIC = "auto"  # metric that picks Models/best.pt: auto (fid with Inception weights, else swd) | swd | fid | kid
EVAL_MAX_COPY_RATE = 0.01  # best.pt only from evaluations with copy_rate at most this (1: any; copy_rate needs test/)
INCEPTION_WEIGHTS = ""  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth for FID/KID (empty: skipped)
TENSORBOARD = False  # also log losses, metrics and sample grids to OUT_DIR/runs (needs: pip install tensorboard)

# --- small data: adaptive discriminator augmentation (StyleGAN2-ADA) -------------------
AUGMENT = "none"  # none | ada (p adapts to D's overfitting) | fixed (p = AUGMENT_P throughout, DiffAugment style)
AUGMENT_P = 0.0  # probability of each augmentation of the images D sees: fixed's p, or ada's starting p
ADA_TARGET = 0.6  # ada: target of r_t = E[sign(D(real))]; p rises while r_t is above it
ADA_INTERVAL = 4  # ada: iterations between adjustments of p
ADA_KIMG = 100.0  # ada: thousands of images for p to move from 0 to 1 at most (StyleGAN2-ADA: 500, for longer runs)
PROGRESSIVE = False  # progressive training: start at 4x4 and fade in each higher resolution
PROGRESSIVE_KIMG = 100.0  # progressive: thousands of images per resolution (half fading it in, half at full weight)
PROGRESSIVE_START = 4  # progressive: the resolution training starts at (a power of two)
PROGRESSIVE_HOLD_KIMG = 0.0  # progressive: thousands of images at PROGRESSIVE_START before the next resolution

# --- speed and several processes (torchrun --nproc_per_node=N train.py ...) ------------
AMP = True  # CUDA: bf16 autocast of the G and D forward passes (penalties stay float32); no effect on CPU
COMPILE = False  # torch.compile the synthesis network, and D off the CPU (eager, with a warning, where it cannot)
WINOGRAD = "auto"  # stride-1 3x3 convolutions by Winograd's F(2x2, 3x3): auto (on for CPU, faster there) | on | off
CACHE_ON_DEVICE = True  # CUDA: keep the uint8 image cache in GPU memory if under a quarter of it (else pinned memory)

# Winograd's convolution runs only where it measured faster than the direct one (docs/speed.md):
# layers of at least MIN_CHANNELS channels and MIN_SIZE pixels; batches in chunks of CHUNK input values.
WINOGRAD_KERNEL = dict(min_channels=128, min_size=16, chunk=2**20)

# bench.py: timed and warm-up training iterations, the generation batch, and the reference 3x3
# convolution that measures the machine's conv peak (CPU; 4x the batch on CUDA)
BENCH = dict(iters=16, warmup=4, generation_batch=64, peak_conv=dict(batch=16, channels=256, size=64),
             rounds=3)  # rounds: --against's alternations of the two codes
# bench.py --check-node: the preset it benches (with and without --compile), the one it trains on the
# demo data and for how many seconds, the evaluation's images, and its folder; --check-tiny shrinks it
# (no --compile there: compiling on a CPU takes minutes).
NODE_CHECK = dict(bench_preset="auto256", compile=(False, True), train_preset="adni256", train_seconds=300,
                  eval_n=1000, iters=16, warmup=4, out_dir="node_check")
NODE_CHECK_TINY = dict(NODE_CHECK, bench_preset="smoke", compile=(False,), train_preset="smoke", train_seconds=15,
                       eval_n=16, iters=2, warmup=1)

# --- generation (flags of generate_images.py, without the GEN_ prefix) ----------------
GEN_MODE = "samples"  # samples | mixing | interpolate | tsne | truncation | project | losses
GEN_CHECKPOINT = "Models"  # checkpoint file or folder (its newest checkpoint); --mode losses also takes a stats.jsonl
GEN_OUT_DIR = "saved_examples/generated"  # folder for the generated PNGs, grid and plots
GEN_N = 16  # samples: number of images when --seeds is not given (seeds 0..N-1)
GEN_SEEDS = ""  # comma list of seeds; empty: 0..N-1 (samples), 0..3 (mixing rows), 0,1 (interpolate), 0..7 (truncation)
GEN_TRUNCATION = 1.0  # truncation psi: 1 is no truncation, 0 gives the mean image
GEN_LABEL = ""  # class name (AD or NC) for a conditional model; empty: alternate classes
GEN_NOISE_MODE = "const"  # const (fixed noise maps) | random | none
GEN_DEVICE = "auto"  # auto | cpu | cuda
GEN_BATCH = 32  # images generated at once
GEN_Z_FILE = ""  # samples: an N x z_dim .npy array of latents, one image per row (zNNNN.png), instead of --seeds
GEN_W_FILE = ""  # samples: one image of a w: explore.py's exported .json, or a .npy of w_dim or num_ws x w_dim numbers
GEN_MIX_SEEDS = "10,11,12,13,14"  # mixing: seeds of the columns, which give the styles outside --mix-layers
GEN_MIX_LAYERS = "0-3"  # mixing: the style layers (0 = 4x4; two per resolution) taken from the row seeds: coarse 0-3
GEN_INTERP = "seeds"  # interpolate: seeds (a path through --seeds) | classes (AD to NC at each seed's z)
GEN_SPACE = "w"  # interpolate: w (linear in W) | z (spherical in Z; classes: linear in the class embedding)
GEN_FRAMES = 9  # interpolate: frames per segment; project: snapshots in the optimisation strip and GIF
GEN_PSIS = "1,0.7,0.5,0"  # truncation: the psi of each row
GEN_TSNE_N = 300  # tsne: generated w per class
GEN_DATA_ROOT = ""  # tsne: real slices (ADNI layout) to project into W and plot with the generated w
GEN_TSNE_REAL = 40  # tsne: real slices projected per class (with --data-root)
GEN_SKIP_BAD_IMAGES = False  # tsne: skip and count unreadable real slices in --data-root instead of stopping
GEN_TARGET = ""  # project: the real slice (PNG, JPEG, ...) to reconstruct
GEN_PROJECT_SPACE = "w"  # project: w (one w for all layers) | w+ (one w per layer: closer fit, less regular)
GEN_PROJECT_STEPS = 300  # project (and tsne with --data-root): optimisation steps
GEN_PROJECT_LR = 0.1  # project: peak Adam learning rate (ramped up, then cosine down)
GEN_PROJECT_FEATURES = 1.0  # project: weight of the discriminator-feature (perceptual) distance beside the pixel MSE
GEN_PROJECT_NOISE_REG = 1e5  # project: weight of the noise-map regulariser (StyleGAN2 projector)
# The projector's schedule (StyleGAN2's): z samples for the mean and spread of w; noise added to w (times
# its spread), ramped down to 0 over w_noise_ramp of the steps; learning-rate ramps as fractions of the steps.
PROJECTOR = dict(w_samples=10000, w_noise=0.05, w_noise_ramp=0.75, lr_rampup=0.05, lr_rampdown=0.25, seed=0)

# --- the explorer (flags of explore.py, without the EXPLORE_ prefix) ------------------
EXPLORE_CHECKPOINT = "Models"  # checkpoint file or folder (its newest checkpoint)
EXPLORE_HOST = "127.0.0.1"  # address to listen on: loopback only (another address warns: the page has no login)
EXPLORE_PORT = 7860  # port of the page, http://HOST:PORT (0: any free port)
EXPLORE_DEVICE = "auto"  # auto | cpu | cuda
EXPLORE_DATA_ROOT = ""  # training slices for "nearest training slice" (empty: the checkpoint's data)
EXPLORE_DIRECTIONS = 6  # principal directions of W offered as sliders (GANSpace)
EXPLORE_UPLOAD_MB = 8  # largest slice upload to project
EXPLORE_PROJECT_STEPS = 200  # optimisation steps of a projection of an uploaded slice

# --- evaluation (flags of evaluate.py, without the EVALUATE_ prefix) -------------------
EVALUATE_CHECKPOINT = "Models"  # checkpoint file, or a folder whose newest checkpoint is used
EVALUATE_DATA_ROOT = ""  # real slices to compare with (empty: the checkpoint's DATA_ROOT)
EVALUATE_SKIP_BAD_IMAGES = False  # skip and count unreadable real slices instead of stopping
EVALUATE_N = 1000  # generated and real images compared (at most the number of real images)
EVALUATE_INCEPTION_WEIGHTS = INCEPTION_WEIGHTS  # pt_inception-2015-12-05-6726825d.pth for FID/KID (empty: skipped)
EVALUATE_CAS = False  # also train ResNet-18 classifiers on real, generated, and both; test on DATA_ROOT/test
EVALUATE_CAS_EPOCHS = 10  # training epochs of each classifier
EVALUATE_OUT = "evaluation.json"  # JSON of every figure; a Markdown table is written beside it (.md)
EVALUATE_TRUNCATION = 1.0  # truncation psi of the generated images (1: none, as for published figures)
EVALUATE_SEED = 0  # seed of the generated and the chosen real images
EVALUATE_DEVICE = "auto"  # auto | cpu | cuda
EVALUATE_BATCH = 64  # images per forward pass

# --- conversion (flags of convert.py, without the CONVERT_ prefix) ---------------------
CONVERT_CHANNELS = "gray"  # gray (an RGB network made 1-channel by luminance weights) | keep (the source's channels)

# --- valid values: checked at the command line, with the flag named in the error -----
CHOICES = {
    "IMAGE_MODE": ("L", "RGB"),
    "RESIZE_MODE": ("pad", "resize"),
    "LR_SCHEDULE": ("constant", "cyclic", "step"),
    "LOSS": ("wgan-gp", "logistic"),
    "AUGMENT": ("none", "ada", "fixed"),
    "DEVICE": ("auto", "cpu", "cuda"),
    "WINOGRAD": ("auto", "on", "off"),
    "STYLE_OP": ("modconv", "adain"),
    "RESAMPLE": ("bilinear", "upfirdn"),
    "CONVERT_CHANNELS": ("gray", "keep"),
    "GEN_NOISE_MODE": ("const", "random", "none"),
    "GEN_DEVICE": ("auto", "cpu", "cuda"),
    "GEN_MODE": ("samples", "mixing", "interpolate", "tsne", "truncation", "project", "losses"),
    "GEN_INTERP": ("seeds", "classes"),
    "GEN_SPACE": ("w", "z"),
    "GEN_PROJECT_SPACE": ("w", "w+"),
    "EXPLORE_DEVICE": ("auto", "cpu", "cuda"),
    "EVAL_METRIC": ("auto", "swd", "fid", "kid"),
    "EVALUATE_DEVICE": ("auto", "cpu", "cuda"),
}
RANGES = {  # inclusive (low, high); None: unbounded
    "RESOLUTION": (32, 1024), "DEMO_ATROPHY": (0, None), "LOAD_THREADS": (1, None),
    "Z_DIM": (1, None), "W_DIM": (1, None), "MAPPING_LAYERS": (1, None),
    "MAPPING_LR_MULT": (1e-6, None), "CHANNEL_BASE": (1, None), "CHANNEL_MAX": (1, None),
    "MBSTD_GROUP": (1, None), "STYLE_MIXING_PROB": (0, 1), "W_AVG_BETA": (0, 1), "ATTENTION_RES": (0, 1024),
    "BATCH_SIZE": (1, None), "EPOCHS": (1, None), "MAX_STEPS": (0, None),
    "KIMG": (0, None), "SNAPSHOT_KIMG": (0, None), "TICK_KIMG": (1e-3, None),
    "G_LR": (0, None), "D_LR": (0, None), "ADAM_BETAS": (0, 0.9999),
    "LR_CYCLE_STEPS": (1, None), "LR_CYCLE_MIN": (0, 1), "LR_STEP_EPOCHS": (1, None),
    "LR_STEP_FACTOR": (0, None), "GP_LAMBDA": (0, None), "DRIFT": (0, None),
    "R1_GAMMA": (0, None), "R1_GAMMA_RES": (0, None), "R1_GAMMA_POWER": (-4, 4),
    "WGAN_R1_GAMMA": (0, None), "D_REG_INTERVAL": (1, None),
    "PL_WEIGHT": (0, None),
    "PL_INTERVAL": (1, None), "MODE_SEEKING": (0, None), "MODE_SEEKING_FULL": (-1, None), "PL_DECAY": (0, 1),
    "PL_BATCH_SHRINK": (1, None),
    "EMA_KIMG": (0, None), "EMA_RAMPUP": (0, None), "SEED": (0, 2**63 - 1),
    "SAMPLE_EVERY": (1, None), "SAMPLE_COUNT": (1, 256), "CHECKPOINT_EVERY": (1, None),
    "KEEP_CHECKPOINTS": (0, None), "GEN_N": (1, None), "GEN_TRUNCATION": (0, 10),
    "GEN_BATCH": (1, None), "GEN_FRAMES": (2, 1000), "GEN_TSNE_N": (10, None), "GEN_TSNE_REAL": (2, None),
    "GEN_PROJECT_STEPS": (1, None), "GEN_PROJECT_LR": (0, None), "GEN_PROJECT_FEATURES": (0, None),
    "GEN_PROJECT_NOISE_REG": (0, None), "EVAL_EVERY": (0, None), "EVAL_N": (8, None), "EVALUATE_N": (8, None),
    "EVAL_MAX_COPY_RATE": (0, 1),
    "EVALUATE_CAS_EPOCHS": (1, None), "EVALUATE_TRUNCATION": (0, 10), "EVALUATE_SEED": (0, 2**63 - 1),
    "EVALUATE_BATCH": (1, None), "ROTATE": (0, 180), "JITTER": (0, 1),
    "AUGMENT_P": (0, 1), "ADA_TARGET": (0, 1), "ADA_INTERVAL": (1, None), "ADA_KIMG": (1e-6, None),
    "PROGRESSIVE_KIMG": (1e-6, None), "PROGRESSIVE_START": (4, None), "PROGRESSIVE_HOLD_KIMG": (0, None),
    "CHANNEL_MIN": (0, None), "EXPLORE_PORT": (0, 65535), "EXPLORE_DIRECTIONS": (0, 32), "EXPLORE_UPLOAD_MB": (1, 1024),
    "EXPLORE_PROJECT_STEPS": (1, 100000), "CONV_CLAMP": (0, None), "FREEZE_D": (0, None),
}

# --- presets: --preset NAME applies these before the flags ----------------------------
PRESETS = {
    # The built-in demo set at 64x64: a small model with StyleGAN2's logistic loss + R1, tuned for
    # quality per minute of a short CPU run (docs/results.md): batch 8, a strong R1 (gamma 4), a high
    # learning rate (0.01) and mode seeking (0.05) against crowding; no path-length penalty or style
    # mixing, 2 mapping layers. 11 epochs.
    "demo": dict(DATA_ROOT=DEMO_ROOT, RESOLUTION=64, CHANNEL_BASE=1024, CHANNEL_MAX=64, Z_DIM=64, W_DIM=64,
                 MAPPING_LAYERS=2, BATCH_SIZE=8, EPOCHS=11, SAMPLE_EVERY=1, CHECKPOINT_EVERY=1,
                 LOSS="logistic", R1_GAMMA=4.0, G_LR=0.01, D_LR=0.01, PL_WEIGHT=0.0,
                 STYLE_MIXING_PROB=0.0, MODE_SEEKING=0.05, EVAL_EVERY=6),
    # The built-in demo set at 256x256 in an hour on a CPU: the demo preset's model and recipe at
    # 64x64 for the quick start's 26,400 images, then growing to 128x128 and 256x256 (--progressive),
    # the highest resolutions 16 feature maps wide, with the training slices' scanner noise. Mode
    # seeking 0.1 (0.15 at full size) and R1's weight rising with the resolution (4, 8, 16 at 64, 128,
    # 256) keep the slices as varied as the real ones and apart from the training slices (docs/results.md).
    "demo256": dict(DATA_ROOT=DEMO_ROOT, RESOLUTION=256, CHANNEL_BASE=1024, CHANNEL_MAX=64, CHANNEL_MIN=16,
                    SCANNER_NOISE=True, Z_DIM=64, W_DIM=64, MAPPING_LAYERS=2, BATCH_SIZE=8, LOSS="logistic",
                    R1_GAMMA=4.0, R1_GAMMA_RES=64, R1_GAMMA_POWER=1.0, G_LR=0.01, D_LR=0.01, PL_WEIGHT=0.0,
                    STYLE_MIXING_PROB=0.0, MODE_SEEKING=0.1, MODE_SEEKING_FULL=0.15,
                    PROGRESSIVE=True, PROGRESSIVE_START=64, PROGRESSIVE_HOLD_KIMG=26.4, PROGRESSIVE_KIMG=8.0,
                    KIMG=52.0, SNAPSHOT_KIMG=8.0, EVAL_EVERY=1),
    # The ADNI course setup at 256x256: z = w = 256, 8 mapping layers, WGAN-GP every step,
    # path length every 16 batches, cyclic learning rate, resize + vertical flips.
    "adni256": dict(RESOLUTION=256, RESIZE_MODE="resize", VFLIP=True, HFLIP=False, Z_DIM=256, W_DIM=256,
                    MAPPING_LAYERS=8, BATCH_SIZE=32, LOSS="wgan-gp", D_REG_INTERVAL=1,
                    LR_SCHEDULE="cyclic", G_LR=0.001, D_LR=0.001),
    # A cheap ADNI setup: 64x64, z = w = 512, batch 64, phased learning rate 1e-4 -> 1e-5.
    "adni64": dict(RESOLUTION=64, Z_DIM=512, W_DIM=512, BATCH_SIZE=64, G_LR=1e-4, D_LR=1e-4,
                   LR_SCHEDULE="step", LR_STEP_EPOCHS=100, LR_STEP_FACTOR=0.1, EPOCHS=150, WGAN_R1_GAMMA=0.002),
    # StyleGAN2-ADA's 'auto' configuration at 256x256, whose published speed is the GPU reference:
    # channels 16384/512, 2 mapping layers, batch 32, logistic loss with R1 every 16 iterations (gamma
    # 0.0002 * 256^2 / 32), path length every 4.
    "auto256": dict(RESOLUTION=256, CHANNEL_BASE=16384, CHANNEL_MAX=512, MAPPING_LAYERS=2, BATCH_SIZE=32,
                    LOSS="logistic", R1_GAMMA=0.4, D_REG_INTERVAL=16, PL_INTERVAL=4),
    # A tiny model for tests and CPU checks: 32x32, several iterations per second on 2 cores.
    "smoke": dict(RESOLUTION=32, Z_DIM=32, W_DIM=32, MAPPING_LAYERS=2, CHANNEL_BASE=512,
                  CHANNEL_MAX=32, BATCH_SIZE=16, EPOCHS=2, SAMPLE_EVERY=1, CHECKPOINT_EVERY=1,
                  SAMPLE_COUNT=8, EMA_KIMG=0.5, PL_INTERVAL=4, D_REG_INTERVAL=4, EVAL_EVERY=1, EVAL_N=64),
}
