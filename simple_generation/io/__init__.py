"""Files in and out for batch jobs: lazy readers, an ordered streaming writer, output records.

Nothing here imports torch or transformers, so the command line can validate inputs before loading a model.
"""

from .readers import FORMATS, ScanReport, detect_format, read_records, record_digest, scan, windows
from .records import InputError, InputRecord, OpenAIRequest, output_record, prompt_text
from .writers import OUTPUT_FORMATS, OrderedWriter, openai_batch_line, output_format_for

__all__ = [
    "FORMATS",
    "OUTPUT_FORMATS",
    "InputError",
    "InputRecord",
    "OpenAIRequest",
    "OrderedWriter",
    "ScanReport",
    "detect_format",
    "openai_batch_line",
    "output_format_for",
    "output_record",
    "prompt_text",
    "read_records",
    "record_digest",
    "scan",
    "windows",
]
