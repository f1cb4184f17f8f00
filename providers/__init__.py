"""perdure.providers: LLM providers behind one protocol.

``OpenAI`` (and any OpenAI-compatible server), ``Anthropic``, ``Scripted`` (no network,
deterministic), ``CallableProvider`` (any function), ``Fallback`` (a chain), with
bounded retries (``RetryPolicy``), a price table (``Pricing``) and one error tree
(``ProviderError``). This package knows nothing of the log or of actors; the vendor
SDKs are imported only when an ``OpenAI`` or ``Anthropic`` provider is constructed.
"""

from perdure.providers.anthropic import Anthropic as Anthropic
from perdure.providers.callable import CallableProvider as CallableProvider
from perdure.providers.errors import AuthenticationError as AuthenticationError
from perdure.providers.errors import BadRequestError as BadRequestError
from perdure.providers.errors import ContextLengthError as ContextLengthError
from perdure.providers.errors import MalformedResponseError as MalformedResponseError
from perdure.providers.errors import ProviderError as ProviderError
from perdure.providers.errors import ProviderUnavailableError as ProviderUnavailableError
from perdure.providers.errors import RateLimitError as RateLimitError
from perdure.providers.errors import RetryableProviderError as RetryableProviderError
from perdure.providers.errors import TerminalProviderError as TerminalProviderError
from perdure.providers.fallback import Fallback as Fallback
from perdure.providers.openai import OpenAI as OpenAI
from perdure.providers.pricing import Price as Price
from perdure.providers.pricing import Pricing as Pricing
from perdure.providers.retry import RetryPolicy as RetryPolicy
from perdure.providers.scripted import Scripted as Scripted
from perdure.providers.streams import ResponseAssembler as ResponseAssembler
from perdure.providers.streams import events_from_response as events_from_response
from perdure.providers.types import LLMRequest as LLMRequest
from perdure.providers.types import LLMResponse as LLMResponse
from perdure.providers.types import Message as Message
from perdure.providers.types import Provider as Provider
from perdure.providers.types import ResponseCompleted as ResponseCompleted
from perdure.providers.types import Role as Role
from perdure.providers.types import StreamEvent as StreamEvent
from perdure.providers.types import TextDelta as TextDelta
from perdure.providers.types import ToolCall as ToolCall
from perdure.providers.types import ToolCallDelta as ToolCallDelta
from perdure.providers.types import ToolSpec as ToolSpec
from perdure.providers.types import Usage as Usage

__all__ = [
    "Anthropic",
    "AuthenticationError",
    "BadRequestError",
    "CallableProvider",
    "ContextLengthError",
    "Fallback",
    "LLMRequest",
    "LLMResponse",
    "MalformedResponseError",
    "Message",
    "OpenAI",
    "Price",
    "Pricing",
    "Provider",
    "ProviderError",
    "ProviderUnavailableError",
    "RateLimitError",
    "ResponseAssembler",
    "ResponseCompleted",
    "RetryPolicy",
    "RetryableProviderError",
    "Role",
    "Scripted",
    "StreamEvent",
    "TerminalProviderError",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolSpec",
    "Usage",
    "events_from_response",
]
