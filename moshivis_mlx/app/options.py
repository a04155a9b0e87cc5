"""What the user asked for, typed: built once from the command line (cli/app.py) and handed
down as is. Nothing below the entry point sees the argparse namespace; a mode that needs
other settings (the demo) derives them with `dataclasses.replace`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..loader import BundleOptions
from ..session import ANSWER_SILENCE_S, MAX_ANSWER_S

if TYPE_CHECKING:
    from ..sampling import GenerationConfig


@dataclass(frozen=True)
class ModelOptions:
    """Which weights, and how to sample them (None: the bundle's default)."""

    bundle: BundleOptions = field(default_factory=BundleOptions)
    """Which model (shared with the other tools)."""
    text_temperature: float | None = None
    audio_temperature: float | None = None
    top_k: int | None = None
    """Text and audio alike."""
    top_p: float | None = None
    """Text and audio alike."""
    xa_start: int | None = None
    seed: int | None = None
    codec_device: str = "default"
    """Where Mimi runs: "default" (the language model's device) or "cpu"."""
    kv_bits: int | None = None
    """The attention caches quantized to 8 bits (None: full precision)."""

    def on_weights(self, weights: Path) -> ModelOptions:
        """The same options on the bundle `weights` (the demo's tiny model)."""
        return replace(self, bundle=replace(self.bundle, weights=weights))

    def generation(self, defaults: GenerationConfig) -> GenerationConfig:
        """The bundle's sampling settings with the ones given here on top."""
        over = {"text_temperature": self.text_temperature,
                "audio_temperature": self.audio_temperature,
                "text_top_k": self.top_k, "audio_top_k": self.top_k,
                "text_top_p": self.top_p, "audio_top_p": self.top_p,
                "xa_start": self.xa_start}
        return replace(defaults, **{k: v for k, v in over.items() if v is not None})


@dataclass(frozen=True)
class ServeOptions:
    """--serve: the model over Kyutai's websocket protocol (moshivis_mlx/serve/)."""

    host: str = "127.0.0.1"
    """Loopback by default; any other address needs TLS and the access token."""
    port: int = 8998
    static: Path | None = None
    """The web client to serve at / (None: ours)."""
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    no_tls: bool = False
    """Plain http/ws: only on loopback (a reverse proxy in front may add TLS)."""
    token: str | None = None
    """The access token (None: a random one when the host is not loopback)."""
    idle_timeout: float = 30.0
    """Seconds without a message from a client before its connection ends."""


@dataclass(frozen=True)
class AppOptions:
    """One run of the app: live mode, file mode (`input_wav`), the demo or the device list."""

    model: ModelOptions
    image: str | None = None
    """The picture to start with, as typed (recorded as given)."""
    no_image: bool = False
    """Plain Moshi: no image encoder is loaded."""
    input_device: int | str | None = None
    """A device number or part of its name (None: the system's)."""
    output_device: int | str | None = None
    echo_cancel: bool = True
    """Live mode: take the model's own voice out of the microphone (off: headphones)."""
    camera: str | None = None
    """Live mode: the image comes from this camera ("" the system's first; or a video
    file); None: no camera."""
    camera_every: float | None = None
    """Live mode: a new camera snapshot every this many seconds (None: only on `c`)."""
    record: bool = True
    record_dir: Path | None = None
    """Where to save a live session (None: ./moshivis-sessions/<date-time>/)."""
    input_wav: str | None = None
    """File mode: the user's side of the conversation, as typed (recorded as given)."""
    output_wav: Path | None = None
    transcript: Path | None = None
    same_length: bool = False
    """File mode: the answer exactly as long as the question (frame i answers frame i)."""
    answer_silence: float = ANSWER_SILENCE_S
    """File mode: the answer has ended after this long of padding and near silence."""
    max_answer_seconds: float = MAX_ANSWER_S
    """File mode: the longest the model may go on after the question."""
    demo: bool = False
    serve: ServeOptions | None = None
    """Serve the model to websocket clients instead of talking in the terminal."""
    list_devices: bool = False
    debug: bool = False
