// TlsChannel: a remote worker's TCP connection (a relay's control connection, or a worker's data
// connection), carried by TLS 1.3 (OpenSSL 3) unless the pool was told not to encrypt
// (RemoteOptions::encrypt = false, loopback only). The one place procpool speaks TLS: the frame
// paths (frame_io.h) read and write through it (ByteStream) where they would read and write the
// socket, so control and data connections, the pool's side, the relay's and the worker's are
// encrypted and checked alike.
//
// Keys: by default an external pre-shared key derived from the pool's token with HKDF-SHA256
// (TlsContext::with_token: no certificates; both sides prove the token by completing the
// handshake, and the session still gets forward secrecy from an ECDHE exchange); or certificates
// (TlsContext::with_certificates: mutual, each side presents its certificate and verifies the
// other's against the given CA; host names are not checked). Every record is authenticated
// (AES-GCM or ChaCha20-Poly1305): a byte changed, dropped, replayed or inserted on the way fails
// the read (kDataLoss), and the connection is unusable from then on.
//
// Reads and writes never block (the socket is non-blocking); read() and write() say when the
// socket had no more to give or take. What poll() cannot see: bytes TLS has decrypted or read
// ahead and not yet handed out. `buffered()` says so, and every reader drains it (FrameStream,
// the worker's transport) before it sleeps in poll().
//
// Fork: a relay completes a data connection's handshake and forks its worker, which goes on with
// the session it inherited (moved_to() once its descriptor is renumbered); the relay then drops
// its copy without a word on the wire. Not thread-safe: one owner.

#ifndef PROCPOOL_LIB_WIRE_TLS_CHANNEL_H_
#define PROCPOOL_LIB_WIRE_TLS_CHANNEL_H_

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/fork_proof_secret.h"
#include "lib/common/unique_fd.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace procpool::internal {

// What a side of the connection is keyed with, shared by all its connections.
class TlsContext {
 public:
  enum class Role { kServer, kClient };  // the pool accepts; a relay dials

  // Keyed by the token: PSK = HKDF-SHA256(token, salt "procpool tls 1.3 psk", 32 bytes), no
  // certificates. kInvalidArgument for an empty token. Each session forgets the key once its
  // handshake is done (it then needs only its own traffic keys).
  static absl::StatusOr<std::shared_ptr<TlsContext>> with_token(absl::string_view token, Role role);
  // Mutual certificates: `cert_file` (PEM, chain allowed) and `key_file` present this side; the
  // peer's certificate must chain to `ca_file`. kInvalidArgument saying which file is wrong.
  static absl::StatusOr<std::shared_ptr<TlsContext>> with_certificates(const std::string& ca_file,
                                                                       const std::string& cert_file,
                                                                       const std::string& key_file,
                                                                       Role role);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  SSL_CTX* get() const { return context_; }
  Role role() const { return role_; }
  // The token's pre-shared key ("" with certificates). Kept in memory a fork leaves behind
  // (fork_proof_secret.h): a worker its relay forks, and its tasks, find no copy of it.
  absl::string_view psk() const { return psk_.view(); }

 private:
  TlsContext(SSL_CTX* context, Role role, ForkProofSecret psk)
      : context_(context), role_(role), psk_(std::move(psk)) {}
  SSL_CTX* context_;
  Role role_;
  ForkProofSecret psk_;
};

class TlsChannel {
 public:
  // A session over `socket` (made non-blocking), its handshake to be done (handshake()); with a
  // null `context`, the connection is plaintext and the channel only owns the socket (left as it
  // was, blocking or not).
  static absl::StatusOr<std::unique_ptr<TlsChannel>> open(std::shared_ptr<TlsContext> context,
                                                          UniqueFd socket);
  ~TlsChannel();
  TlsChannel(const TlsChannel&) = delete;
  TlsChannel& operator=(const TlsChannel&) = delete;

  int fd() const { return socket_.get(); }
  bool encrypted() const { return ssl_ != nullptr; }

  // One step of the handshake, never blocking: kDone once it is complete (at once when plaintext),
  // else what the socket must become before the next step. kUnauthenticated when it failed (the
  // peer has another token or an untrusted certificate, or is no TLS peer), saying OpenSSL's why.
  enum class Step { kDone, kWantRead, kWantWrite };
  absl::StatusOr<Step> handshake();
  // Steps the handshake until it is done, waiting in poll(); kDeadlineExceeded after `deadline`.
  absl::Status handshake_within(absl::Time deadline);
  bool established() const { return established_; }

  // Like read(2) on a non-blocking socket: the bytes read (> 0), 0 at the end of the stream, -1
  // when nothing is ready. kDataLoss ("TLS record authentication failed ...") when a record fails
  // its check (tampering, or no TLS peer), or the peer's alert says one of ours did.
  absl::StatusOr<ssize_t> read(void* into, size_t size);
  // Once read() said kDataLoss: bytes were changed, dropped or inserted on the way — unlike a
  // connection that closed or broke (read() then says 0, or the socket's error).
  bool record_failed() const { return record_failed_; }
  // After read(): true if it stopped because TLS held nothing more, so that poll() tells of what
  // comes next (false: it stopped because `size` was reached).
  bool starved() const { return starved_; }
  // Bytes TLS has in hand that poll() cannot see: read() again before waiting.
  bool buffered() const;
  // After a read() that starved: part of a record came and the rest has not (a frame begun, as far
  // as the partial-frame clock is concerned: frame_stream.h).
  bool has_partial_record() const;

  // Writes from `pieces`, in records of up to 16 KiB; returns the bytes taken (0 when the socket
  // takes nothing now). Bytes not taken must be offered again, first, by the next write. A bulk
  // write (more than one record) encrypts 64 KiB of records before it sends them with one send():
  // a system call (and a wakeup of the reader) per 16 KiB record cost more than encrypting it.
  // Bytes count as taken only once their record has gone to the socket: the rest of a record the
  // socket did not take waits here, and goes first when those bytes are offered again.
  absl::StatusOr<size_t> write(const iovec* pieces, size_t count);

  // 32 bytes only the two ends of this session know (RFC 8446 exporter, `label`): what binds a
  // data connection to its control session. "" when plaintext.
  std::string exporter(absl::string_view label) const;

  // In a forked worker: its descriptor now has number `fd` (the old number is closed).
  void moved_to(int fd);

 private:
  friend struct TlsSocketBio;  // tls_channel.cc: how the session reaches the socket
  // Sends what a bulk write left of its records; returns the bytes of plaintext whose records are
  // now all sent.
  absl::StatusOr<size_t> send_unsent();
  // The session's output (a record, an alert): to the socket, or, while a bulk write gathers its
  // records or some are unsent, after them. Like send(2): -1 with errno EAGAIN when it cannot.
  ssize_t emit(const char* data, size_t size);

  TlsChannel(std::shared_ptr<TlsContext> context, UniqueFd socket, SSL* ssl)
      : context_(std::move(context)), socket_(std::move(socket)), ssl_(ssl) {}
  // Once the handshake is done: the session keeps no copy of the token's key (tls_channel.cc).
  void forget_psk();

  std::shared_ptr<TlsContext> context_;
  UniqueFd socket_;
  SSL* ssl_;
  bool established_ = false;
  bool starved_ = true;
  absl::Status failed_;  // once a record failed: every later read says so
  bool record_failed_ = false;
  std::unique_ptr<char[]> staging_;  // small pieces gathered into one record
  // Records a bulk write encrypted and has not sent yet: ciphertext from unsent_from_ on, and for
  // each record, where its ciphertext ends and how many bytes of plaintext it holds.
  bool gathering_ = false;  // within a bulk write: the session's output goes to unsent_
  std::vector<char> unsent_;
  size_t unsent_from_ = 0;
  struct UnsentRecord {
    size_t end;
    size_t plaintext;
  };
  std::deque<UnsentRecord> unsent_records_;
};

}  // namespace procpool::internal

#endif  // PROCPOOL_LIB_WIRE_TLS_CHANNEL_H_
