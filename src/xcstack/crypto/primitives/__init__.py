"""国密 primitives: SM2 (`sm2`, over a native backend), SM3 (`sm3`), SM4 modes (`sm4`) and the DER codecs (`der`).

Synchronous, thread-safe, free of I/O. Code outside `xcstack.crypto` uses `xcstack.crypto.recipes` (and
the SM2 key API in `sm2`), not these modules one by one.
"""
