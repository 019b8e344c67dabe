"""The crypto capability: 国密 algorithms, named/versioned keys, the HSM owner and its backends.

- `xcstack.crypto.recipes`: what other capabilities use (SM4-GCM seal/open, HMAC-SM3, PBKDF2, SM3), with the
  SM2 key API in `xcstack.crypto.primitives.sm2`; `primitives/` holds SM2/SM3/SM4, DER and the SM2 backends;
- `xcstack.crypto.errors`: error classes with stable codes;
- `xcstack.crypto.client`: `CryptoClient` (`ctx.services.crypto`): async sign/verify/encrypt/decrypt/
  hash/hmac/random; `OwnerClient` (HSM owner over IPC) and `DirectClient` (in-process soft keys);
- `xcstack.crypto.service`: the op dispatcher shared by the owner and direct mode;
- `xcstack.crypto.keystore`: key records, master key, sealing;
- `xcstack.crypto.backends`: soft, pkcs11 (PyKCS11 + ctypes hot path), sdf (GM/T 0018 via ctypes);
- `xcstack.crypto.owner`: the HSM owner side process; `capability`, `routes`, `protocol`, `cli`.

See docs/crypto.md.
"""
