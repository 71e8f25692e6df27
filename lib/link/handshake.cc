#include "lib/link/handshake.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/random.h>

#include <cstring>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "procpool/pool_options.h"

namespace procpool::internal {

std::string make_nonce() {
  std::string nonce(kNonceBytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(nonce.data()), kNonceBytes) != 1) {
    // OpenSSL's generator failed to seed: take the kernel's directly.
    size_t got = 0;
    while (got < kNonceBytes) {
      const ssize_t n = ::getrandom(nonce.data() + got, kNonceBytes - got, 0);
      if (n > 0) got += static_cast<size_t>(n);
    }
  }
  return nonce;
}

std::string prove(absl::string_view token, absl::string_view role, absl::string_view first,
                  absl::string_view second) {
  if (token.empty()) return "";
  // Lengths go in too, so that no two (role, first, second) give the same input; big-endian, so
  // that hosts of either byte order compute the same input.
  std::string message;
  for (absl::string_view part : {role, first, second}) {
    const uint32_t length = static_cast<uint32_t>(part.size());
    for (int shift = 24; shift >= 0; shift -= 8) message.push_back(static_cast<char>((length >> shift) & 0xff));
    message.append(part.data(), part.size());
  }
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_length = 0;
  HMAC(EVP_sha256(), token.data(), static_cast<int>(token.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac, &mac_length);
  return std::string(reinterpret_cast<const char*>(mac), mac_length);
}

std::string session_secret(absl::string_view token, absl::string_view worker_nonce,
                           absl::string_view pool_nonce, absl::string_view control_exporter) {
  return prove(token, "session", absl::StrCat(worker_nonce, pool_nonce), control_exporter);
}

bool proof_matches(absl::string_view token, absl::string_view role, absl::string_view first,
                   absl::string_view second, absl::string_view proof) {
  if (token.empty()) return false;
  const std::string expected = prove(token, role, first, second);
  if (expected.size() != proof.size()) return false;
  return CRYPTO_memcmp(expected.data(), proof.data(), expected.size()) == 0;
}

}  // namespace procpool::internal

namespace procpool {

std::string make_token() {
  const std::string bytes = internal::make_nonce();  // 32 bytes from the CSPRNG
  static_assert(internal::kNonceBytes == 32);
  return absl::BytesToHexString(bytes);
}

}  // namespace procpool
