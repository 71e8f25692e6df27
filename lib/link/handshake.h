// The handshake of a remote worker's connection, and the proof of its token.
//
// A remote worker (its relay, lib/link/relay.h) dials the pool and the two prove to each other
// that they share the token, without sending it: each sends a fresh random nonce, and each
// answers with HMAC-SHA256(token, role, the other's nonce, its own) (OpenSSL's libcrypto). A
// recorded exchange is useless later (the nonces are new each time) and the token never crosses
// the wire. The side that dialled proves first, and the pool proves only to a worker whose proof
// it checked: anyone can dial a pool, and a pool that answered every hello with an HMAC over its
// token would hand out material to guess a weak token offline. Neither side says what it is (the
// worker type, its host, its pid) before the other side's proof holds; then both check the
// protocol version and the worker type (W, its Job and its Result), and refuse a mismatch with a
// message saying what differs. launchId is the PROCPOOL_LAUNCH_ID the pool gave a worker it
// launched: it tells the pool which launch to fail when it refuses that worker (it proves
// nothing, and is no one's once used).
//
//   worker -> pool   hello        {version, nonce_w, launchId}
//   pool -> worker   challenge    {version, nonce_p}   or refused {why}
//   worker -> pool   credentials  {HMAC(token, "worker", nonce_p, nonce_w), workerType, host, pid}
//                    or refused {why}  (its version differs)
//   pool -> worker   welcome      {HMAC(token, "pool", nonce_w, nonce_p), workerType, limits,
//                                  heartbeat, names}   or refused {why}
//   worker -> pool   refused {why}, if the pool's proof is wrong or it serves no such type
//
// Each worker the relay forks then gets a connection of its own (its data connection), asked for
// by the pool's `spawn` with a fresh random id; its first frame is
//
//   worker -> pool   attach     {id, HMAC(session, "data", id, data_exporter)}
//
// which the pool accepts once, for the spawn that is waiting for it, and only from the control
// session that spawn was asked of: `session` = HMAC(token, "session", nonce_w || nonce_p,
// control_exporter) is known only to the two ends of that control session (the exporters are
// TLS's, RFC 8446 section 7.5, "" in plaintext), and data_exporter ties the proof to this data
// connection's own TLS session, so it cannot be replayed into another.
//
// Every pool has a token (RemoteOptions::token, or one it made: make_token()). The HMAC's input
// is the same bytes on every host (lengths big-endian), so hosts of either byte order agree.
//
// All of this runs inside TLS 1.3 (tls_channel.h), keyed by the token or by certificates: the
// TLS handshake authenticates both ends and encrypts and checks every frame after it. The
// exchange above is kept inside it: with certificates it is what proves the token, and in every
// mode it carries the version and type checks and binds data connections to their session.

#ifndef PROCPOOL_LIB_LINK_HANDSHAKE_H_
#define PROCPOOL_LIB_LINK_HANDSHAKE_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace procpool::internal {

// Bump whenever protocol.capnp changes in a way an older peer would misread.
inline constexpr uint32_t kProtocolVersion = 3;
inline constexpr size_t kNonceBytes = 32;
// TLS exporter labels: a control session's, and a data connection's own.
inline constexpr char kSessionExporterLabel[] = "EXPORTER-procpool-session";
inline constexpr char kDataExporterLabel[] = "EXPORTER-procpool-data";

// A fresh random nonce (kNonceBytes, from the system's CSPRNG).
std::string make_nonce();

// HMAC-SHA256(token, role || first || second), each part preceded by its length as 4 bytes,
// big-endian; "" for an empty token (which proves nothing: proof_matches() refuses it).
std::string prove(absl::string_view token, absl::string_view role, absl::string_view first,
                  absl::string_view second);

// The key a control session's data connections prove (see above): both ends compute it once the
// handshake holds.
std::string session_secret(absl::string_view token, absl::string_view worker_nonce,
                           absl::string_view pool_nonce, absl::string_view control_exporter);

// True if `proof` is what prove() gives for a non-empty token; compared in constant time.
bool proof_matches(absl::string_view token, absl::string_view role, absl::string_view first,
                   absl::string_view second, absl::string_view proof);

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_LINK_HANDSHAKE_H_
