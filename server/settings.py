"""The server's one settings object. Every default is written here, once; `server.cli` reads them.

Every field is also an environment variable, named here, once (`ENVIRONMENT`): TGI's launcher variable
where TGI has the same option (`TGI_VARIABLES`), else `MEDUSA_` and the field's name in capitals.

The properties import what they need (torch comes with it) when called, so that `medusa-serve --help`
answers without loading torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The most running greedy requests at which a speculative step still paid on 2 CPU cores, by drafter,
# each with its default trees. `python -m benchmarks.crossover --batches 1,2,3,4 --rounds 6`, 64 new
# tokens, AMD EPYC (Zen 5), speculative / plain tok/s at batch 1 / 2 / 3 / 4: the heads 1.38 / 1.31 /
# 0.95 / 0.73 in float32, 1.42 / 1.13 / 0.96 / 0.84 in bfloat16; the draft layer, whose drafting grows
# with the batch, 1.32 / 1.04 / 0.80 / 0.54 in float32, 1.14 / 0.87 / 0.72 in bfloat16 (--rounds 4).
# Shorter runs (2-4 rounds) put the heads' batch 3 at 0.81-1.05 and the layer's batch 2 at 0.79-0.87.
# The heads on an AMX Xeon (benchmarks.serving, float32, before our CPU kernels): 1.09x / 1.01x / 0.98x
# / 0.84x the plain throughput at 1 / 2 / 4 / 8 clients.
CPU_SPECULATIVE_BATCH = {"heads": 2, "eagle": 1}


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        default=None, description="Hugging Face folder, GGUF file, or hub id org/name or org/name@revision "
        "(a branch, tag or commit; a local path of that name wins), fetched into the Hugging Face cache; "
        "default: the embedded SmolLM2-135M-Instruct")
    device: str = Field(default="cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        default=None, description="weights: float32, bfloat16, float16, or auto (bfloat16 on CUDA and on "
        "CPUs with native bf16 products, else float32); default: float32 on the CPU (greedy speculation "
        "is token-exact in float32; in bfloat16 only while our CPU kernels take all of a step's rows, as "
        "for one sequence and a small tree), bfloat16 on CUDA")
    compile: Literal["auto", "on", "off"] = Field(
        default="auto", description="compile the decoding step with torch.compile, every graph built at "
        "start-up, before the server listens; auto: on for CUDA, off on the CPU, and should a graph fail to "
        "build, the log says why and the server runs the step eagerly (on: that failure stops the start-up)")
    host: str = Field(default="127.0.0.1", description="address to bind; 0.0.0.0 exposes the server")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on; 0: any free port")
    max_batch_size: int = Field(default=8, ge=1, description="sequences decoded together (KV-cache slots)")
    max_input_tokens: int = Field(default=1024, ge=1, description="longest prompt, in tokens")
    max_total_tokens: int = Field(default=2048, ge=2, description="prompt + generated tokens per request")
    max_queue: int = Field(default=128, ge=1, description="requests waiting for a slot before 429")
    payload_limit: int = Field(default=2_000_000, ge=1, description="largest request body, in bytes (as "
                               "TGI's --payload-limit); a larger one gets 413 before it is read whole")
    max_prefill_tokens: int = Field(default=512, ge=1, description="prompt tokens prefilled between two "
                                    "decode steps; a longer prompt goes in chunks so running streams flow")
    request_timeout: float = Field(default=600.0, gt=0, description="seconds from a request's arrival to "
                                   "its last token, else it fails (504); `parameters.timeout` may ask less")
    drain_timeout: float = Field(default=60.0, ge=0, description="seconds SIGTERM waits for the requests "
                                 "already taken to finish before the server exits")
    json_output: bool = Field(default=False, description="log JSON lines, one object per record with the "
                              "request's id, for a log collector (as TGI's --json-output); default: text")
    medusa_heads: str = Field(
        default="auto", description="the drafter: a folder or a hub id org/name or org/name@revision of "
        "Medusa heads (this server's format or the official Medusa one) or of a draft layer (this "
        "server's eagle_config.json, or an official EAGLE-1/2 checkpoint); 'none': no speculation; "
        "'auto': the project's shipped drafter that --drafter names when serving the embedded model (the "
        "draft layer trained in the dtype served)")
    drafter: Literal["heads", "eagle"] = Field(
        default="heads", description="which kind of drafter --medusa-heads auto loads: the Medusa heads, or "
        "the EAGLE-style draft layer; a folder given to --medusa-heads must hold this kind")
    chat_template: Literal["auto", "on", "off"] = Field(
        default="auto", description="wrap /generate inputs in the model's chat template as one user "
        "message; auto: on for the embedded instruct model, whose raw-text answers are often empty")
    tree: str | None = Field(default=None, description="candidate tree: a name (an unknown one gets the "
                             "list), a JSON file, or dynamic:N (each sequence's own tree of N nodes, grown "
                             "from the drafter's confidence; options ,topk=K ,depth=D ,lookup=L); "
                             "default, for heads: the shipped 'gpu' tree on CUDA, "
                             "'dynamic-cpu' for float32 weights on the CPU, 'dynamic-cpu-bf16' for bfloat16 "
                             "on a CPU with native bf16 products (AMX or AVX-512 BF16), "
                             "'dynamic-cpu-bf16-emulated' on one without; for the draft layer: 'eagle-gpu', "
                             "'eagle-dynamic-cpu-float32', 'eagle-dynamic-cpu' (AMX), "
                             "'eagle-dynamic-cpu-bf16-avx512' (AVX-512 BF16), "
                             "'eagle-dynamic-cpu-bf16-emulated' in the same cases")
    api_key: str | None = Field(default=None, description="require 'Authorization: Bearer KEY' on every "
                                "route but /health, /metrics and the playground page; several keys "
                                "separated by commas")
    metrics_api_key_required: bool = Field(
        default=False, description="put /metrics behind the API key too; off, it stays open for a "
        "Prometheus inside the network boundary, as TGI's")
    cors_allow_origins: str | None = Field(
        default=None, description="origins a browser may call the server from, separated by commas ('*': "
        "any); default: none (CORS off)")
    max_speculative_batch: int | None = Field(
        default=None, ge=0, description="when more requests than this run and all of them are greedy, decode "
        "plainly (same output, less work); default on the CPU: the measured crossover, 2 with the heads and "
        "1 with the draft layer (python -m benchmarks.crossover measures a machine's); no limit on CUDA")
    prefix_caching: bool = Field(
        default=True, description="a prompt that begins with tokens a KV slot holds from an earlier prompt "
        "(a conversation's next turn, a shared system prompt) reuses their K/V instead of prefilling them "
        "again; usage reports them as prompt_tokens_details.cached_tokens")

    @model_validator(mode="after")
    def _keys_given(self) -> Settings:
        if self.api_key is not None and not self.api_keys:  # an empty API_KEY must not turn auth off
            raise ValueError("api_key holds no key: give one or more keys separated by commas")
        return self

    @model_validator(mode="after")
    def _metrics_key_has_keys(self) -> Settings:
        if self.metrics_api_key_required and not self.api_keys:  # else /metrics would stay open, silently
            raise ValueError("metrics_api_key_required needs api_key: without keys no route asks for one")
        return self

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(f"max_input_tokens ({self.max_input_tokens}) must be less than "
                             f"max_total_tokens ({self.max_total_tokens})")
        return self

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys (none: no authentication)."""
        return tuple(key.strip() for key in (self.api_key or "").split(",") if key.strip())

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in (self.cors_allow_origins or "").split(",") if o.strip())

    @property
    def embedded(self) -> bool:
        """Whether the model is the embedded SmolLM2-135M-Instruct."""
        from runtime.loading import is_embedded

        return is_embedded(self.model)

    def heads_path_for(self, dtype: str) -> str | None:
        """The drafter's folder or hub id to load, or None for plain decoding: with 'auto', the shipped
        one for the embedded model in the weights' dtype (known once loaded)."""
        if self.medusa_heads == "none":
            return None
        if self.medusa_heads == "auto":
            from medusa.checkpoints import shipped_drafter

            shipped = shipped_drafter(self.drafter, dtype)
            return str(shipped) if self.embedded and shipped.is_dir() else None
        return self.medusa_heads

    @property
    def use_chat_template(self) -> bool:
        return self.chat_template == "on" or (self.chat_template == "auto" and self.embedded)

    @property
    def speculative_batch_limit(self) -> int | None:
        if self.max_speculative_batch is not None:
            return self.max_speculative_batch
        return None if self.device.startswith("cuda") else CPU_SPECULATIVE_BATCH[self.drafter]

    def tree_for(self, dtype: str) -> str:
        """The candidate tree to use with the drafter: the one asked for, or the one shipped for the
        drafter, the device and the weights' dtype (known once loaded: --dtype auto resolves then)."""
        from medusa.tree import default_tree

        return default_tree(self.device, dtype, self.drafter) if self.tree is None else self.tree


# TGI's launcher variables, for the options TGI has with the same meaning, so that a TGI deployment's
# environment carries over. HOST, not TGI's HOSTNAME: shells and containers set HOSTNAME to the machine's
# name, which would bind the server to whatever address that name resolves to.
TGI_VARIABLES = {"model": "MODEL_ID", "host": "HOST", "port": "PORT", "dtype": "DTYPE",
                 "max_batch_size": "MAX_BATCH_SIZE", "max_input_tokens": "MAX_INPUT_TOKENS",
                 "max_total_tokens": "MAX_TOTAL_TOKENS", "payload_limit": "PAYLOAD_LIMIT",
                 "api_key": "API_KEY", "cors_allow_origins": "CORS_ALLOW_ORIGIN",
                 "json_output": "JSON_OUTPUT"}


def environment_variable(field: str) -> str:
    """The variable that sets `field`: TGI's name, else MEDUSA_<FIELD> (MEDUSA_HEADS, not
    MEDUSA_MEDUSA_HEADS)."""
    if field in TGI_VARIABLES:
        return TGI_VARIABLES[field]
    name = field.upper()
    return name if name.startswith("MEDUSA_") else f"MEDUSA_{name}"


ENVIRONMENT = {field: environment_variable(field) for field in Settings.model_fields}
