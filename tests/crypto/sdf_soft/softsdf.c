/*
 * softsdf: a small software GM/T 0018-2012 (SDF) device for xcstack's tests.
 *
 * It implements the entry points xcstack's sdf backend calls, over OpenSSL 3's SM2/SM3/SM4, with
 * the standard structures (ECCref_MAX_BITS 512 by default; -DECCREF_MAX_BITS=256 for the narrow
 * vendor layout). Device state lives in $SOFTSDF_DIR:
 *   sign_<i>.pem / enc_<i>.pem   SM2 key pairs at index i (generated on first use = "provisioned")
 *   kek_<i>.bin                   16-byte SM4 key-encryption keys
 * The private-key access password is $SOFTSDF_PASSWORD (default "xcstack").
 * Built by the tests (gcc -shared -fPIC softsdf.c -lcrypto); never shipped, never committed built.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#ifndef ECCREF_MAX_BITS
#define ECCREF_MAX_BITS 512
#endif
#define ECCref_MAX_LEN ((ECCREF_MAX_BITS + 7) / 8)

typedef struct { unsigned int bits; unsigned char x[ECCref_MAX_LEN]; unsigned char y[ECCref_MAX_LEN]; } ECCrefPublicKey;
typedef struct { unsigned char r[ECCref_MAX_LEN]; unsigned char s[ECCref_MAX_LEN]; } ECCSignature;
typedef struct {
    unsigned char x[ECCref_MAX_LEN]; unsigned char y[ECCref_MAX_LEN];
    unsigned char M[32]; unsigned int L; unsigned char C[1];
} ECCCipher;

#define SDR_OK 0x0
#define SDR_BASE 0x01000000
#define SDR_UNKNOWERR (SDR_BASE + 0x01)
#define SDR_NOTSUPPORT (SDR_BASE + 0x02)
#define SDR_OPENDEVICE (SDR_BASE + 0x05)
#define SDR_PARDENY (SDR_BASE + 0x07)
#define SDR_KEYNOTEXIST (SDR_BASE + 0x08)
#define SDR_ALGNOTSUPPORT (SDR_BASE + 0x09)
#define SDR_PKOPERR (SDR_BASE + 0x0B)
#define SDR_SKOPERR (SDR_BASE + 0x0C)
#define SDR_SIGNERR (SDR_BASE + 0x0D)
#define SDR_VERIFYERR (SDR_BASE + 0x0E)
#define SDR_SYMOPERR (SDR_BASE + 0x0F)
#define SDR_KEYERR (SDR_BASE + 0x15)
#define SDR_ENCDATAERR (SDR_BASE + 0x16)
#define SDR_RANDERR (SDR_BASE + 0x17)
#define SDR_INARGERR (SDR_BASE + 0x1D)
#define SDR_OUTARGERR (SDR_BASE + 0x1E)

#define SGD_SM4_ECB 0x00000401
#define SGD_SM4_CBC 0x00000402
#define SGD_SM4_MAC 0x00000410
#define SGD_SM2_1 0x00020200
#define SGD_SM2_3 0x00020800

#define MAX_INDEX 1024

typedef struct { int magic; } Device;
typedef struct { unsigned char rights[MAX_INDEX + 1]; } Session;
typedef struct { unsigned char key[16]; } SymKey;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *state_dir(void) {
    const char *d = getenv("SOFTSDF_DIR");
    return d && *d ? d : NULL;
}

/* ---- key storage -------------------------------------------------------------------------- */
static EVP_PKEY *load_or_make_sm2(const char *kind, unsigned int index) {
    char path[4096];
    const char *dir = state_dir();
    if (!dir || index == 0 || index > MAX_INDEX) return NULL;
    snprintf(path, sizeof path, "%s/%s_%u.pem", dir, kind, index);
    EVP_PKEY *pkey = NULL;
    pthread_mutex_lock(&g_lock);
    FILE *f = fopen(path, "r");
    if (f) {
        pkey = PEM_read_PrivateKey(f, NULL, NULL, NULL);
        fclose(f);
    } else {
        pkey = EVP_PKEY_Q_keygen(NULL, NULL, "SM2");
        if (pkey) {
            f = fopen(path, "w");
            if (f) {
                chmod(path, 0600);
                PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL);
                fclose(f);
            }
        }
    }
    pthread_mutex_unlock(&g_lock);
    return pkey;
}

static int load_or_make_kek(unsigned int index, unsigned char out[16]) {
    char path[4096];
    const char *dir = state_dir();
    if (!dir || index == 0 || index > MAX_INDEX) return 0;
    snprintf(path, sizeof path, "%s/kek_%u.bin", dir, index);
    int ok = 0;
    pthread_mutex_lock(&g_lock);
    FILE *f = fopen(path, "rb");
    if (f) {
        ok = fread(out, 1, 16, f) == 16;
        fclose(f);
    } else if (RAND_bytes(out, 16) == 1) {
        f = fopen(path, "wb");
        if (f) {
            chmod(path, 0600);
            ok = fwrite(out, 1, 16, f) == 16;
            fclose(f);
        }
    }
    pthread_mutex_unlock(&g_lock);
    return ok;
}

/* ---- helpers ------------------------------------------------------------------------------- */
static void put_be(unsigned char *field, const unsigned char *v32) {
    memset(field, 0, ECCref_MAX_LEN);
    memcpy(field + ECCref_MAX_LEN - 32, v32, 32);
}

static int export_pub(EVP_PKEY *pkey, ECCrefPublicKey *pub) {
    unsigned char pt[65];
    size_t len = 0;
    if (!EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof pt, &len) || len != 65) return 0;
    pub->bits = 256;
    put_be(pub->x, pt + 1);
    put_be(pub->y, pt + 33);
    return 1;
}

static EVP_PKEY *pub_from_ref(const ECCrefPublicKey *pub) {
    unsigned char pt[65];
    pt[0] = 4;
    memcpy(pt + 1, pub->x + ECCref_MAX_LEN - 32, 32);
    memcpy(pt + 33, pub->y + ECCref_MAX_LEN - 32, 32);
    EVP_PKEY *pkey = NULL;
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "SM2", NULL);
    if (bld && ctx && OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "SM2", 0) &&
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof pt) &&
        (params = OSSL_PARAM_BLD_to_param(bld)) != NULL && EVP_PKEY_fromdata_init(ctx) == 1) {
        if (EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1) pkey = NULL;
    }
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    EVP_PKEY_CTX_free(ctx);
    return pkey;
}

/* minimal DER for SM2 ciphertexts: SEQUENCE { INTEGER x, INTEGER y, OCTET STRING C3, OCTET STRING C2 } */
static size_t der_len(unsigned char *p, size_t n) {
    if (n < 0x80) { if (p) p[0] = (unsigned char)n; return 1; }
    if (n < 0x100) { if (p) { p[0] = 0x81; p[1] = (unsigned char)n; } return 2; }
    if (p) { p[0] = 0x82; p[1] = (unsigned char)(n >> 8); p[2] = (unsigned char)n; }
    return 3;
}

static size_t der_uint(unsigned char *p, const unsigned char *v, size_t n) {
    while (n > 1 && v[0] == 0) { v++; n--; }
    size_t pad = (v[0] & 0x80) ? 1 : 0, body = n + pad, h = 1 + der_len(NULL, body);
    if (p) { p[0] = 0x02; der_len(p + 1, body); if (pad) p[h] = 0; memcpy(p + h + pad, v, n); }
    return h + body;
}

static size_t der_octets(unsigned char *p, const unsigned char *v, size_t n) {
    size_t h = 1 + der_len(NULL, n);
    if (p) { p[0] = 0x04; der_len(p + 1, n); memcpy(p + h, v, n); }
    return h + n;
}

static int der_read(const unsigned char **pp, const unsigned char *end, int tag, const unsigned char **val, size_t *n) {
    const unsigned char *p = *pp;
    if (end - p < 2 || p[0] != tag) return 0;
    size_t len = p[1];
    p += 2;
    if (len & 0x80) {
        int k = len & 0x7f;
        if (k < 1 || k > 2 || end - p < k) return 0;
        len = 0;
        for (int i = 0; i < k; i++) len = (len << 8) | *p++;
    }
    if ((size_t)(end - p) < len) return 0;
    *val = p; *n = len; *pp = p + len;
    return 1;
}

static int der_to_cipher(const unsigned char *der, size_t derlen, ECCCipher *c, unsigned int cap) {
    const unsigned char *p = der, *end = der + derlen, *seq, *v;
    size_t seqlen, n;
    if (!der_read(&p, end, 0x30, &seq, &seqlen)) return 0;
    p = seq; end = seq + seqlen;
    memset(c->x, 0, ECCref_MAX_LEN); memset(c->y, 0, ECCref_MAX_LEN);
    if (!der_read(&p, end, 0x02, &v, &n)) return 0;
    while (n > 32 && *v == 0) { v++; n--; }
    if (n > 32) return 0;
    memcpy(c->x + ECCref_MAX_LEN - n, v, n);
    if (!der_read(&p, end, 0x02, &v, &n)) return 0;
    while (n > 32 && *v == 0) { v++; n--; }
    if (n > 32) return 0;
    memcpy(c->y + ECCref_MAX_LEN - n, v, n);
    if (!der_read(&p, end, 0x04, &v, &n) || n != 32) return 0;
    memcpy(c->M, v, 32);
    if (!der_read(&p, end, 0x04, &v, &n) || n > cap) return 0;
    c->L = (unsigned int)n;
    memcpy(c->C, v, n);
    return 1;
}

static size_t cipher_to_der(const ECCCipher *c, unsigned char *out) {
    size_t body = der_uint(NULL, c->x, ECCref_MAX_LEN) + der_uint(NULL, c->y, ECCref_MAX_LEN) +
                  der_octets(NULL, c->M, 32) + der_octets(NULL, c->C, c->L);
    size_t h = 1 + der_len(NULL, body), o;
    if (!out) return h + body;
    out[0] = 0x30; der_len(out + 1, body); o = h;
    o += der_uint(out + o, c->x, ECCref_MAX_LEN);
    o += der_uint(out + o, c->y, ECCref_MAX_LEN);
    o += der_octets(out + o, c->M, 32);
    o += der_octets(out + o, c->C, c->L);
    return o;
}

static int sm4_run(const EVP_CIPHER *cipher, int enc, const unsigned char *key, const unsigned char *iv,
                   const unsigned char *in, int inlen, unsigned char *out, int *outlen) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok = 0, l1 = 0, l2 = 0;
    if (ctx && EVP_CipherInit_ex(ctx, cipher, NULL, key, iv, enc) == 1 && EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 &&
        EVP_CipherUpdate(ctx, out, &l1, in, inlen) == 1 && EVP_CipherFinal_ex(ctx, out + l1, &l2) == 1) {
        *outlen = l1 + l2;
        ok = 1;
    }
    EVP_CIPHER_CTX_free(ctx);
    return ok;
}

/* ---- device and session --------------------------------------------------------------------- */
int SDF_OpenDevice(void **phDeviceHandle) {
    if (!phDeviceHandle) return SDR_INARGERR;
    if (!state_dir()) return SDR_OPENDEVICE;
    Device *d = calloc(1, sizeof *d);
    if (!d) return SDR_UNKNOWERR;
    d->magic = 0x5df;
    *phDeviceHandle = d;
    return SDR_OK;
}

int SDF_CloseDevice(void *hDeviceHandle) { free(hDeviceHandle); return SDR_OK; }

int SDF_OpenSession(void *hDeviceHandle, void **phSessionHandle) {
    if (!hDeviceHandle || !phSessionHandle) return SDR_INARGERR;
    Session *s = calloc(1, sizeof *s);
    if (!s) return SDR_UNKNOWERR;
    *phSessionHandle = s;
    return SDR_OK;
}

int SDF_CloseSession(void *hSessionHandle) { free(hSessionHandle); return SDR_OK; }

int SDF_GenerateRandom(void *hSessionHandle, unsigned int uiLength, unsigned char *pucRandom) {
    if (!hSessionHandle || !pucRandom) return SDR_INARGERR;
    return RAND_bytes(pucRandom, (int)uiLength) == 1 ? SDR_OK : SDR_RANDERR;
}

int SDF_GetPrivateKeyAccessRight(void *hSessionHandle, unsigned int uiKeyIndex, unsigned char *pucPassword,
                                 unsigned int uiPwdLength) {
    Session *s = hSessionHandle;
    const char *want = getenv("SOFTSDF_PASSWORD");
    if (!want) want = "xcstack";
    if (!s || uiKeyIndex == 0 || uiKeyIndex > MAX_INDEX) return SDR_INARGERR;
    if (!pucPassword || strlen(want) != uiPwdLength || memcmp(want, pucPassword, uiPwdLength) != 0) return SDR_PARDENY;
    s->rights[uiKeyIndex] = 1;
    return SDR_OK;
}

int SDF_ReleasePrivateKeyAccessRight(void *hSessionHandle, unsigned int uiKeyIndex) {
    Session *s = hSessionHandle;
    if (!s || uiKeyIndex == 0 || uiKeyIndex > MAX_INDEX) return SDR_INARGERR;
    s->rights[uiKeyIndex] = 0;
    return SDR_OK;
}

/* ---- SM2 ----------------------------------------------------------------------------------- */
static int export_index(const char *kind, unsigned int idx, ECCrefPublicKey *pub) {
    if (!pub) return SDR_INARGERR;
    EVP_PKEY *k = load_or_make_sm2(kind, idx);
    if (!k) return SDR_KEYNOTEXIST;
    int ok = export_pub(k, pub);
    EVP_PKEY_free(k);
    return ok ? SDR_OK : SDR_PKOPERR;
}

int SDF_ExportSignPublicKey_ECC(void *h, unsigned int uiKeyIndex, ECCrefPublicKey *pucPublicKey) {
    return h ? export_index("sign", uiKeyIndex, pucPublicKey) : SDR_INARGERR;
}

int SDF_ExportEncPublicKey_ECC(void *h, unsigned int uiKeyIndex, ECCrefPublicKey *pucPublicKey) {
    return h ? export_index("enc", uiKeyIndex, pucPublicKey) : SDR_INARGERR;
}

/* pucData is the 32-byte digest e = SM3(Z || M), computed by the caller (GM/T 0018 convention) */
int SDF_InternalSign_ECC(void *hSessionHandle, unsigned int uiISKIndex, unsigned char *pucData,
                         unsigned int uiDataLength, ECCSignature *pucSignature) {
    Session *s = hSessionHandle;
    if (!s || !pucData || !pucSignature || uiDataLength != 32 || uiISKIndex == 0 || uiISKIndex > MAX_INDEX)
        return SDR_INARGERR;
    if (!s->rights[uiISKIndex]) return SDR_PARDENY;
    EVP_PKEY *k = load_or_make_sm2("sign", uiISKIndex);
    if (!k) return SDR_KEYNOTEXIST;
    int rc = SDR_SIGNERR;
    unsigned char der[80];
    size_t derlen = sizeof der;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(k, NULL);
    if (ctx && EVP_PKEY_sign_init(ctx) == 1 && EVP_PKEY_sign(ctx, der, &derlen, pucData, 32) == 1) {
        const unsigned char *p = der;
        ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
        if (sig) {
            unsigned char r[32], sv[32];
            const BIGNUM *br, *bs;
            ECDSA_SIG_get0(sig, &br, &bs);
            if (BN_bn2binpad(br, r, 32) == 32 && BN_bn2binpad(bs, sv, 32) == 32) {
                put_be(pucSignature->r, r);
                put_be(pucSignature->s, sv);
                rc = SDR_OK;
            }
            ECDSA_SIG_free(sig);
        }
    }
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(k);
    return rc;
}

static int verify_with(EVP_PKEY *k, const unsigned char *e, const ECCSignature *sig) {
    int rc = SDR_VERIFYERR;
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig->r + ECCref_MAX_LEN - 32, 32, NULL), *s = BN_bin2bn(sig->s + ECCref_MAX_LEN - 32, 32, NULL);
    unsigned char *der = NULL;
    int derlen;
    if (es && r && s && ECDSA_SIG_set0(es, r, s) == 1) {
        r = s = NULL;
        derlen = i2d_ECDSA_SIG(es, &der);
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(k, NULL);
        if (derlen > 0 && ctx && EVP_PKEY_verify_init(ctx) == 1 &&
            EVP_PKEY_verify(ctx, der, (size_t)derlen, e, 32) == 1)
            rc = SDR_OK;
        EVP_PKEY_CTX_free(ctx);
        OPENSSL_free(der);
    }
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(es);
    return rc;
}

int SDF_ExternalVerify_ECC(void *hSessionHandle, unsigned int uiAlgID, ECCrefPublicKey *pucPublicKey,
                           unsigned char *pucDataInput, unsigned int uiInputLength, ECCSignature *pucSignature) {
    if (!hSessionHandle || !pucPublicKey || !pucDataInput || !pucSignature || uiInputLength != 32) return SDR_INARGERR;
    if (uiAlgID != SGD_SM2_1) return SDR_ALGNOTSUPPORT;
    EVP_PKEY *k = pub_from_ref(pucPublicKey);
    if (!k) return SDR_PKOPERR;
    int rc = verify_with(k, pucDataInput, pucSignature);
    EVP_PKEY_free(k);
    return rc;
}

int SDF_InternalVerify_ECC(void *hSessionHandle, unsigned int uiIPKIndex, unsigned char *pucData,
                           unsigned int uiDataLength, ECCSignature *pucSignature) {
    if (!hSessionHandle || !pucData || !pucSignature || uiDataLength != 32) return SDR_INARGERR;
    EVP_PKEY *k = load_or_make_sm2("sign", uiIPKIndex);
    if (!k) return SDR_KEYNOTEXIST;
    int rc = verify_with(k, pucData, pucSignature);
    EVP_PKEY_free(k);
    return rc;
}

static int encrypt_with(EVP_PKEY *k, const unsigned char *data, unsigned int len, ECCCipher *out) {
    int rc = SDR_PKOPERR;
    size_t derlen = 0;
    unsigned char *der = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(k, NULL);
    if (ctx && EVP_PKEY_encrypt_init(ctx) == 1 && EVP_PKEY_encrypt(ctx, NULL, &derlen, data, len) == 1 &&
        (der = OPENSSL_malloc(derlen)) != NULL && EVP_PKEY_encrypt(ctx, der, &derlen, data, len) == 1 &&
        der_to_cipher(der, derlen, out, len))
        rc = SDR_OK;
    OPENSSL_free(der);
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

/* caller allocates ECCCipher with room for uiDataLength bytes of C */
int SDF_InternalEncrypt_ECC(void *hSessionHandle, unsigned int uiIPKIndex, unsigned int uiAlgID,
                            unsigned char *pucData, unsigned int uiDataLength, ECCCipher *pucEncData) {
    if (!hSessionHandle || !pucData || !pucEncData || uiDataLength == 0 || uiDataLength > 65536) return SDR_INARGERR;
    if (uiAlgID != SGD_SM2_3) return SDR_ALGNOTSUPPORT;
    EVP_PKEY *k = load_or_make_sm2("enc", uiIPKIndex);
    if (!k) return SDR_KEYNOTEXIST;
    int rc = encrypt_with(k, pucData, uiDataLength, pucEncData);
    EVP_PKEY_free(k);
    return rc;
}

int SDF_ExternalEncrypt_ECC(void *hSessionHandle, unsigned int uiAlgID, ECCrefPublicKey *pucPublicKey,
                            unsigned char *pucData, unsigned int uiDataLength, ECCCipher *pucEncData) {
    if (!hSessionHandle || !pucPublicKey || !pucData || !pucEncData || uiDataLength == 0) return SDR_INARGERR;
    if (uiAlgID != SGD_SM2_3) return SDR_ALGNOTSUPPORT;
    EVP_PKEY *k = pub_from_ref(pucPublicKey);
    if (!k) return SDR_PKOPERR;
    int rc = encrypt_with(k, pucData, uiDataLength, pucEncData);
    EVP_PKEY_free(k);
    return rc;
}

int SDF_InternalDecrypt_ECC(void *hSessionHandle, unsigned int uiISKIndex, unsigned int uiAlgID,
                            ECCCipher *pucEncData, unsigned char *pucData, unsigned int *puiDataLength) {
    Session *s = hSessionHandle;
    if (!s || !pucEncData || !pucData || !puiDataLength || uiISKIndex == 0 || uiISKIndex > MAX_INDEX)
        return SDR_INARGERR;
    if (uiAlgID != SGD_SM2_3) return SDR_ALGNOTSUPPORT;
    if (!s->rights[uiISKIndex]) return SDR_PARDENY;
    if (pucEncData->L == 0 || pucEncData->L > 65536) return SDR_ENCDATAERR;
    EVP_PKEY *k = load_or_make_sm2("enc", uiISKIndex);
    if (!k) return SDR_KEYNOTEXIST;
    int rc = SDR_ENCDATAERR;
    size_t derlen = cipher_to_der(pucEncData, NULL), outlen = pucEncData->L;
    unsigned char *der = OPENSSL_malloc(derlen);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(k, NULL);
    if (der && ctx) {
        cipher_to_der(pucEncData, der);
        if (EVP_PKEY_decrypt_init(ctx) == 1 && EVP_PKEY_decrypt(ctx, pucData, &outlen, der, derlen) == 1) {
            *puiDataLength = (unsigned int)outlen;
            rc = SDR_OK;
        }
    }
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(der);
    EVP_PKEY_free(k);
    return rc;
}

/* ---- SM4 session keys ------------------------------------------------------------------------ */
int SDF_GenerateKeyWithKEK(void *hSessionHandle, unsigned int uiKeyBits, unsigned int uiAlgID, unsigned int uiKEKIndex,
                           unsigned char *pucKey, unsigned int *puiKeyLength, void **phKeyHandle) {
    unsigned char kek[16];
    int outlen = 0;
    if (!hSessionHandle || !pucKey || !puiKeyLength || !phKeyHandle || uiKeyBits != 128) return SDR_INARGERR;
    if (uiAlgID != SGD_SM4_ECB) return SDR_ALGNOTSUPPORT;
    if (!load_or_make_kek(uiKEKIndex, kek)) return SDR_KEYNOTEXIST;
    SymKey *key = calloc(1, sizeof *key);
    if (!key) return SDR_UNKNOWERR;
    if (RAND_bytes(key->key, 16) != 1 || !sm4_run(EVP_sm4_ecb(), 1, kek, NULL, key->key, 16, pucKey, &outlen)) {
        free(key);
        return SDR_SYMOPERR;
    }
    *puiKeyLength = (unsigned int)outlen;
    *phKeyHandle = key;
    return SDR_OK;
}

int SDF_ImportKeyWithKEK(void *hSessionHandle, unsigned int uiAlgID, unsigned int uiKEKIndex, unsigned char *pucKey,
                         unsigned int uiKeyLength, void **phKeyHandle) {
    unsigned char kek[16];
    int outlen = 0;
    if (!hSessionHandle || !pucKey || !phKeyHandle || uiKeyLength != 16) return SDR_INARGERR;
    if (uiAlgID != SGD_SM4_ECB) return SDR_ALGNOTSUPPORT;
    if (!load_or_make_kek(uiKEKIndex, kek)) return SDR_KEYNOTEXIST;
    SymKey *key = calloc(1, sizeof *key);
    if (!key) return SDR_UNKNOWERR;
    if (!sm4_run(EVP_sm4_ecb(), 0, kek, NULL, pucKey, 16, key->key, &outlen)) {
        free(key);
        return SDR_KEYERR;
    }
    *phKeyHandle = key;
    return SDR_OK;
}

int SDF_DestroyKey(void *hSessionHandle, void *hKeyHandle) {
    if (!hSessionHandle || !hKeyHandle) return SDR_INARGERR;
    OPENSSL_cleanse(hKeyHandle, sizeof(SymKey));
    free(hKeyHandle);
    return SDR_OK;
}

static int sym(void *hSession, void *hKey, unsigned int alg, unsigned char *iv, const unsigned char *in, unsigned int n,
               unsigned char *out, unsigned int *outlen, int enc) {
    SymKey *key = hKey;
    int l = 0;
    if (!hSession || !key || !in || !out || !outlen || n == 0 || n % 16) return SDR_INARGERR;
    if (alg == SGD_SM4_ECB) {
        if (!sm4_run(EVP_sm4_ecb(), enc, key->key, NULL, in, (int)n, out, &l)) return SDR_SYMOPERR;
    } else if (alg == SGD_SM4_CBC) {
        if (!iv) return SDR_INARGERR;
        if (!sm4_run(EVP_sm4_cbc(), enc, key->key, iv, in, (int)n, out, &l)) return SDR_SYMOPERR;
        memcpy(iv, enc ? out + n - 16 : in + n - 16, 16); /* IV chains on, as devices do */
    } else {
        return SDR_ALGNOTSUPPORT;
    }
    *outlen = (unsigned int)l;
    return SDR_OK;
}

int SDF_Encrypt(void *hSessionHandle, void *hKeyHandle, unsigned int uiAlgID, unsigned char *pucIV,
                unsigned char *pucData, unsigned int uiDataLength, unsigned char *pucEncData,
                unsigned int *puiEncDataLength) {
    return sym(hSessionHandle, hKeyHandle, uiAlgID, pucIV, pucData, uiDataLength, pucEncData, puiEncDataLength, 1);
}

int SDF_Decrypt(void *hSessionHandle, void *hKeyHandle, unsigned int uiAlgID, unsigned char *pucIV,
                unsigned char *pucEncData, unsigned int uiEncDataLength, unsigned char *pucData,
                unsigned int *puiDataLength) {
    return sym(hSessionHandle, hKeyHandle, uiAlgID, pucIV, pucEncData, uiEncDataLength, pucData, puiDataLength, 0);
}

int SDF_CalculateMAC(void *hSessionHandle, void *hKeyHandle, unsigned int uiAlgID, unsigned char *pucIV,
                     unsigned char *pucData, unsigned int uiDataLength, unsigned char *pucMAC,
                     unsigned int *puiMACLength) {
    SymKey *key = hKeyHandle;
    int l = 0;
    if (!hSessionHandle || !key || !pucIV || !pucData || !pucMAC || !puiMACLength || uiDataLength == 0 ||
        uiDataLength % 16)
        return SDR_INARGERR;
    if (uiAlgID != SGD_SM4_MAC) return SDR_ALGNOTSUPPORT;
    unsigned char *tmp = malloc(uiDataLength);
    if (!tmp) return SDR_UNKNOWERR;
    int ok = sm4_run(EVP_sm4_cbc(), 1, key->key, pucIV, pucData, (int)uiDataLength, tmp, &l);
    if (ok) {
        memcpy(pucMAC, tmp + uiDataLength - 16, 16);
        *puiMACLength = 16;
    }
    free(tmp);
    return ok ? SDR_OK : SDR_SYMOPERR;
}
