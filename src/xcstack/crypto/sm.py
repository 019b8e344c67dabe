"""The test suite's and benchmarks' single namespace over the 国密 primitives and recipes (nothing else).

Code under src/ imports `xcstack.crypto.recipes` (outside the crypto package: recipes and the SM2 key API
in `primitives.sm2`) or the primitive modules themselves; tests/crypto/test_import_rules.py keeps it so.
"""

from xcstack.crypto.primitives.curve import N, P
from xcstack.crypto.primitives.der import (
    ct_c1c2c3_to_c1c3c2,
    ct_c1c3c2_to_c1c2c3,
    ct_c1c3c2_to_der,
    ct_der_to_c1c3c2,
    sig_der_to_raw,
    sig_raw_to_der,
)
from xcstack.crypto.primitives.sm2 import (
    DEFAULT_UID,
    SM2_MAX_PLAINTEXT,
    CtFormat,
    SigFormat,
    SM2PrivateKey,
    SM2PublicKey,
    set_sm2_backend,
    sm2_backend_info,
)
from xcstack.crypto.primitives.sm4 import (
    sm4_cbc_decrypt,
    sm4_cbc_encrypt,
    sm4_ctr,
    sm4_ctr_decrypt,
    sm4_ctr_encrypt,
    sm4_gcm_decrypt,
    sm4_gcm_encrypt,
)
from xcstack.crypto.recipes import (
    SM3,
    hmac_sm3,
    hmac_sm3_verify,
    pbkdf2_sm3,
    random_bytes,
    sm3,
    sm4_gcm_open,
    sm4_gcm_seal,
)

__all__ = [
    "DEFAULT_UID",
    "SM2_MAX_PLAINTEXT",
    "SM3",
    "CtFormat",
    "N",
    "P",
    "SM2PrivateKey",
    "SM2PublicKey",
    "SigFormat",
    "ct_c1c2c3_to_c1c3c2",
    "ct_c1c3c2_to_c1c2c3",
    "ct_c1c3c2_to_der",
    "ct_der_to_c1c3c2",
    "hmac_sm3",
    "hmac_sm3_verify",
    "pbkdf2_sm3",
    "random_bytes",
    "set_sm2_backend",
    "sig_der_to_raw",
    "sig_raw_to_der",
    "sm2_backend_info",
    "sm3",
    "sm4_cbc_decrypt",
    "sm4_cbc_encrypt",
    "sm4_ctr",
    "sm4_ctr_decrypt",
    "sm4_ctr_encrypt",
    "sm4_gcm_decrypt",
    "sm4_gcm_encrypt",
    "sm4_gcm_open",
    "sm4_gcm_seal",
]
