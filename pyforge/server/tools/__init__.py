"""OpenAI tool calling: request fields, per-family formats (prompt, grammar,
parsing) and the streaming parser. No engine dependency: the chat route joins
them (tools -> chat template or system prompt, grammar -> SamplingParams,
output text -> message.tool_calls / delta.tool_calls)."""
from pyforge.server.tools.formats import FORMATS, GenericFormat, NativeFormat, ToolCall, ToolFormat, detect_format
from pyforge.server.tools.request import Tool, ToolChoice, parse_tool_request
from pyforge.server.tools.stream import (CallSyntax, ContentDelta, Delta, StreamParser, ToolCallDelta,
                                         WholeAnswerParser)

__all__ = ["FORMATS", "CallSyntax", "ContentDelta", "Delta", "GenericFormat", "NativeFormat", "StreamParser",
           "Tool", "ToolCall", "ToolCallDelta", "ToolChoice", "ToolFormat", "WholeAnswerParser", "detect_format",
           "parse_tool_request"]
