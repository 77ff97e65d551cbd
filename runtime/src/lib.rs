//! VM runtime (filled in by issue 5).
