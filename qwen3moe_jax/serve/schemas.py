"""The request bodies of /v1/chat/completions and /v1/completions as pydantic models: the types and ranges each
field takes (what /openapi.json describes). Checks that need the model (the vocabulary, the KV cache, the
template) are prepare.py's."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000  # the stop-string filter's per-token work grows with a stop string's length squared


def _integral(value: Any) -> Any:
    # In JSON 5.0 is the integer 5 (and some encoders write every number with a fraction); 5.5 stays a float,
    # which strict validation then refuses.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class BaseRequest(BaseModel):
    """Fields shared by both endpoints. Strict: a string where a number belongs is an error, as at OpenAI.
    Unknown fields are ignored, so clients that send more of OpenAI's API still work.

    Integers the engine holds as int32 are taken at any size where a larger value means exactly what the
    largest useful one does: top_k >= the vocabulary is top_k off, repeat_last_n >= the KV cache length is
    the whole context (see sampling_params). max_tokens of any size is checked against the KV cache."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1, description="extension: 0 or -1 is off, and so is any value >= the vocabulary")
    seed: Int | None = Field(None, ge=0, lt=2**32)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    # Bounded so that penalized logits stay finite in float32 at any temperature.
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="extension, llama.cpp/vLLM style")
    repeat_last_n: Int = Field(64, ge=0, description="extension: the penalty's window (past the KV cache "
                                                     "length: the whole context)")
    n: Int = Field(1, ge=1, le=1, description="one choice per request")
    # OpenAI's parameters this server does not implement: refused unless neutral (see UNSUPPORTED), never ignored.
    presence_penalty: float | None = Field(None, description="not supported: only 0")
    frequency_penalty: float | None = Field(None, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only {}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for names


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text, as OpenAI sends it back (or an object)")


class MessageToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_call_id, reasoning_content... reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(BaseRequest):
    messages: list[Message] = Field(min_length=1)
    echo: bool | None = Field(None, description="not supported: only false (echo is /v1/completions')")
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None  # extension, e.g. {"enable_thinking": false}
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None


PromptText = Annotated[str, StringConstraints(min_length=1)]
# Token ids are plain ints: a per-item validator in Python would take 0.25 s, on the event loop, for the 1.4 million
# ids a 4 MiB body can hold (Rust's own check takes 0.07 s).
PromptIds = Annotated[list[int], Field(min_length=1)]
MAX_PROMPTS = 64  # prompts in one body: each is a request of its own, in the scheduler's queue


class CompletionRequest(BaseRequest):
    prompt: PromptText | PromptIds | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] | \
        Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
            description="a text, token ids, or a list of either (one choice each, `index` in this order)")
    logprobs: Int | None = Field(None, ge=0, le=20, description="the chosen tokens' logprobs and this many "
                                                               "alternatives (with echo, the prompt's too)")
    max_tokens: Int | None = Field(16, ge=0, description="0: no new token (with echo: the prompt scored)")
    echo: bool = Field(False, description="the prompt comes back before the completion, in the text and, with "
                                          "logprobs, in its tokens (the first one's logprob null)")
    best_of: Int | None = Field(None, description="not supported: only 1")
    suffix: str | None = Field(None, description='not supported: only ""')


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: str
    add_special_tokens: bool = Field(False, description="accepted for vLLM's clients; Qwen3 adds none either way")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    tokens: list[int]


BaseRequest.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()
