"""The project's named errors.

Every error carries a message a user can act on. Input errors (one bad file) become a row in the
``quarantine`` table with the class name as ``error_class``; the run goes on. Stage errors (the stage
itself cannot run) end the CLI with a one-line reason and a non-zero exit status.
"""

from __future__ import annotations


class CxrError(Exception):
    """Base class of every error this project raises on purpose."""


# --- one input file cannot become a tensor: quarantined, the run goes on ---------------------------
class InputError(CxrError):
    """One input file cannot become a tensor; it is quarantined with this error's class and message."""


class EmptyFileError(InputError):
    """The file has zero bytes."""


class UnsupportedFormatError(InputError):
    """The bytes are not PNG, JPEG or DICOM (checked by signature, not by file extension)."""


class DecodeError(InputError):
    """The file claims a supported format but its content cannot be decoded (corrupt or truncated)."""


class NoPixelDataError(InputError):
    """A DICOM file without a Pixel Data element (e.g. a structured report or a presentation state)."""


class UnsupportedImageError(InputError):
    """A decodable image this pipeline does not turn into a tensor (photometric, frames, sign, ...)."""


class ImageTooLargeError(InputError):
    """The header declares more pixels than the configured limit; refused before decoding."""


class PixelRangeError(InputError):
    """Pixel values exceed the maximum the header allows (e.g. above 2**BitsStored - 1)."""


class SourceReadError(InputError):
    """The file was listed but its bytes could not be read (permissions, vanished, network)."""


class DecoderCrash(InputError):
    """The decoder process died (a native crash: a signal such as SIGSEGV/SIGABRT, or an exit) on this file.

    Quarantined and never retried automatically: requeue it (``cxr requeue --error-class DecoderCrash``)
    after a decoder upgrade.
    """


class DecodeTimeout(InputError):
    """Decoding this file took longer than the per-file limit (``CXR_DECODE_TIMEOUT_S``); the decoder was killed.

    Quarantined and never retried automatically: requeue it (``cxr requeue --error-class DecodeTimeout``)
    after raising the limit or upgrading the decoder.
    """


class TransientReadError(SourceReadError):
    """Reading failed for a reason that passes (throttling, a timeout) even after retries with backoff:
    the file is recorded as ``retryable`` and read again by the next run, not quarantined."""


# --- the stage itself cannot run ----------------------------------------------------------------------
class ConfigError(CxrError):
    """A setting is missing or invalid."""


class StorageError(CxrError):
    """A folder or s3:// location cannot be listed, read or written."""


class WeightsNotFoundError(CxrError):
    """No model weights could be found or downloaded."""


class QueryError(CxrError):
    """A SQL query cannot run: bad SQL, an unknown table or saved query, or a missing/invalid parameter."""


# --- one input file cannot become a tensor (continued) --------------------------------------------
class CodestreamMismatchError(DecodeError):
    """A compressed DICOM frame's codestream declares a larger image than the header's Rows x Columns."""
