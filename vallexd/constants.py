"""The numbers and names of the VALL-E X contract, each stated once (torch-free).

Where each comes from: ../shared/reference/MODEL.md (codebooks, vocabularies, the AR
stop rule, language rows), TEXT-FRONTEND.md (request languages and accents), and the
published file names of the checkpoint, the Vocos vocoder and EnCodec.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- audio
SAMPLE_RATE = 24_000  # Hz: EnCodec 24 kHz and Vocos encodec-24khz
HOP = 320  # samples per code frame
FRAMES_PER_SECOND = SAMPLE_RATE // HOP  # 75
NUM_QUANTIZERS = 8  # EnCodec codebooks at 6 kbps
CODEBOOK_SIZE = 1024  # codes per codebook (0..1023)
MAX_PROMPT_SECONDS = 15.0  # longest recording turned into a voice prompt

# --------------------------------------------------------------------------- model
TEXT_VOCAB = 2048  # rows of the text embeddings; phoneme ids are 0..2047
EOS = CODEBOOK_SIZE  # AR end-of-speech token (1024)
BOS = CODEBOOK_SIZE + 1  # AR begin-of-speech token (1025)
MAX_FRAMES_PER_TOKEN = 16  # AR stop rule: at most 16 x S frames
#: Model language embedding rows (MODEL.md); not the .npz lang_code order below.
MODEL_LANGUAGES: dict[str, int] = {"en": 0, "zh": 1, "ja": 2}

# --------------------------------------------------------------------------- prompts (.npz)
#: The .npz `lang_code` values of the published presets.
LANG_CODES: dict[str, int] = {"zh": 0, "ja": 1, "en": 2}
#: Largest prompt accepted from a file (30 s; the 53 published presets reach 22 s / 191 tokens).
MAX_PROMPT_FRAMES = 2250
MAX_PROMPT_TEXT = 1024

# --------------------------------------------------------------------------- text
LANGUAGES: tuple[str, ...] = ("en", "zh", "ja")  # spoken languages
REQUEST_LANGUAGES: tuple[str, ...] = (*LANGUAGES, "mix", "auto")
ACCENTS: tuple[str, ...] = ("native", "request", *LANGUAGES)

# --------------------------------------------------------------------------- sampling
#: Below this, float32 logits / T overflow to inf and the softmax turns to NaN.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 10.0
MAX_TOP_K = CODEBOOK_SIZE  # the AR stage has 1025 classes; k >= that is the same as no top-k

# --------------------------------------------------------------------------- numerics
#: --quantize: which decoders run int8 weight matmuls (vallexd/inference/quantize.py).
QUANTIZE_MODES: tuple[str, ...] = ("none", "nar", "all")
#: --nar-thread: NAR stages + vocoder on a second thread (vallexd/inference/nar_stage.py).
NAR_THREAD_MODES: tuple[str, ...] = ("auto", "on", "off")

# --------------------------------------------------------------------------- model files
CHECKPOINT_FILE = "vallex-checkpoint.pt"
VOCOS_DIR = "vocos-encodec-24khz"
VOCOS_FILES: tuple[str, ...] = ("config.yaml", "pytorch_model.bin")
ENCODEC_FILE = "encodec_24khz-d7cc33bc.th"
#: Whisper checkpoints (optional, for transcribing voice recordings): <models>/whisper/<size>.pt,
#: the layout of the reference's download_root.
WHISPER_DIR = "whisper"
WHISPER_DEFAULT_SIZE = "medium"
