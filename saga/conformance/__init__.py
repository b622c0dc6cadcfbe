"""The conformance kit: checks a participant, written in any language, against docs/protocol.md.

``kafka-saga conformance participant --topic T --config FILE`` runs it from the command line.
"""

from saga.conformance.kit import CaseResult, ConformanceFailure, ConformanceReport, ParticipantKit

__all__ = ["CaseResult", "ConformanceFailure", "ConformanceReport", "ParticipantKit"]
