#include "lib/wire/tls_channel.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace procpool::internal {
namespace {

// Who we say we are in the PSK handshake: the same for every pool (the key is what differs).
constexpr char kPskIdentity[] = "procpool-token-psk-v1";
constexpr unsigned char kTls13Aes128GcmSha256[] = {0x13, 0x01};
constexpr size_t kRecordBytes = 16384;  // the largest plaintext of one TLS record
// With read-ahead, one read() takes several records: fewer system calls per frame.
constexpr size_t kReadBufferBytes = 64 * 1024;
// A read that has taken this much is a bulk transfer: it goes on while the socket has more.
constexpr size_t kBulkReadBytes = 16 * 1024;
// A bulk write sends its records this many bytes at a time (4 records), not one by one. (256 KiB
// measured no better, and each channel keeps this much room once it has written in bulk.)
constexpr size_t kBulkSendBytes = 64 * 1024;

// OpenSSL's reasons, queued on this thread, as one line (and the queue emptied).
std::string openssl_errors() {
  std::string out;
  while (const unsigned long error = ERR_get_error()) {
    char text[256];
    ERR_error_string_n(error, text, sizeof(text));
    if (!out.empty()) out += "; ";
    out += text;
  }
  return out.empty() ? "no reason given" : out;
}

}  // namespace

// The socket under a session: OpenSSL's own socket BIO writes with write(2), which raises
// SIGPIPE when the peer is gone (and kills a program that did not ignore it). Ours sends with
// MSG_NOSIGNAL: a vanished peer is an error, as everywhere else in procpool. Its data is the
// channel, whose emit() holds back a bulk write's records to send them together.
struct TlsSocketBio {
  static TlsChannel* channel(BIO* bio) { return static_cast<TlsChannel*>(BIO_get_data(bio)); }

  static int write(BIO* bio, const char* data, int length) {
    BIO_clear_retry_flags(bio);
    const ssize_t sent = channel(bio)->emit(data, static_cast<size_t>(length));
    if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(bio);
    return static_cast<int>(sent);
  }

  static int read(BIO* bio, char* data, int length) {
    BIO_clear_retry_flags(bio);
    const ssize_t got = ::recv(channel(bio)->fd(), data, static_cast<size_t>(length), 0);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(bio);
    return static_cast<int>(got);
  }

  static long control(BIO* bio, int command, long, void*) {
    switch (command) {
      case BIO_CTRL_FLUSH:
        return 1;
      case BIO_C_GET_FD:
        return channel(bio)->fd();
      default:
        return 0;
    }
  }

  static int create(BIO* bio) {
    BIO_set_init(bio, 1);
    return 1;
  }

  static const BIO_METHOD* method() {
    static BIO_METHOD* const made = [] {
      BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "procpool socket");
      BIO_meth_set_write(m, write);
      BIO_meth_set_read(m, read);
      BIO_meth_set_ctrl(m, control);
      BIO_meth_set_create(m, create);
      return m;
    }();
    return made;
  }
};

namespace {

const TlsContext* context_of(SSL* ssl) {
  return static_cast<const TlsContext*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
}

// The session a PSK handshake resumes: the token's key, for TLS_AES_128_GCM_SHA256.
SSL_SESSION* psk_session(SSL* ssl) {
  const TlsContext* context = context_of(ssl);
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kTls13Aes128GcmSha256);
  if (context == nullptr || cipher == nullptr || context->psk().empty()) return nullptr;
  SSL_SESSION* session = SSL_SESSION_new();
  if (session == nullptr) return nullptr;
  if (SSL_SESSION_set1_master_key(session, reinterpret_cast<const unsigned char*>(context->psk().data()),
                                  context->psk().size()) != 1 ||
      SSL_SESSION_set_cipher(session, cipher) != 1 ||
      SSL_SESSION_set_protocol_version(session, TLS1_3_VERSION) != 1) {
    SSL_SESSION_free(session);
    return nullptr;
  }
  return session;
}

int use_psk(SSL* ssl, const EVP_MD* md, const unsigned char** id, size_t* id_length,
            SSL_SESSION** session) {
  *session = nullptr;
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kTls13Aes128GcmSha256);
  // After a HelloRetryRequest the hash is fixed: offer the key only for the same one.
  if (cipher == nullptr || (md != nullptr && md != SSL_CIPHER_get_handshake_digest(cipher))) return 1;
  *session = psk_session(ssl);
  if (*session == nullptr) return 0;
  *id = reinterpret_cast<const unsigned char*>(kPskIdentity);
  *id_length = sizeof(kPskIdentity) - 1;
  return 1;
}

int find_psk(SSL* ssl, const unsigned char* identity, size_t identity_length, SSL_SESSION** session) {
  *session = nullptr;
  // Another identity: no key, and without a certificate the handshake then fails.
  if (identity_length != sizeof(kPskIdentity) - 1 ||
      std::memcmp(identity, kPskIdentity, identity_length) != 0) {
    return 1;
  }
  *session = psk_session(ssl);
  return *session == nullptr ? 0 : 1;
}

// TLS 1.3 only, no session tickets or cache, writes that may stop at a record.
absl::StatusOr<SSL_CTX*> new_context(TlsContext::Role role) {
  SSL_CTX* context =
      SSL_CTX_new(role == TlsContext::Role::kServer ? TLS_server_method() : TLS_client_method());
  if (context == nullptr) return absl::InternalError(absl::StrCat("TLS: ", openssl_errors()));
  SSL_CTX_set_min_proto_version(context, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(context, TLS1_3_VERSION);
  SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(context, 0);
  // Suites of SHA-256 only: the token's key is for SHA-256, and a server that picked a SHA-384
  // suite would set it aside. AES-GCM first (AES-NI), ChaCha20 for hosts without it.
  SSL_CTX_set_ciphersuites(context, "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256");
  // A peer that vanishes without close_notify (a worker killed) is an end of file, as over TCP.
  SSL_CTX_set_options(context, SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_mode(context, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_read_ahead(context, 1);
  SSL_CTX_set_default_read_buffer_len(context, kReadBufferBytes);
  return context;
}

}  // namespace

absl::StatusOr<std::shared_ptr<TlsContext>> TlsContext::with_token(absl::string_view token, Role role) {
  if (token.empty()) return absl::InvalidArgumentError("TLS keyed by the token needs a token");
  // Derived straight into memory a fork leaves behind: no copy of it anywhere else.
  constexpr size_t kPskBytes = 32;
  ForkProofSecret psk(kPskBytes);
  if (!psk.valid()) return absl::ErrnoToStatus(errno, "TLS: mapping a page for the key");
  size_t psk_length = kPskBytes;
  EVP_PKEY_CTX* kdf = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
  static constexpr char kSalt[] = "procpool tls 1.3 psk";
  static constexpr char kInfo[] = "procpool remote workers";
  const bool derived =
      kdf != nullptr && EVP_PKEY_derive_init(kdf) == 1 &&
      EVP_PKEY_CTX_set_hkdf_md(kdf, EVP_sha256()) == 1 &&
      EVP_PKEY_CTX_set1_hkdf_salt(kdf, reinterpret_cast<const unsigned char*>(kSalt), sizeof(kSalt) - 1) == 1 &&
      EVP_PKEY_CTX_set1_hkdf_key(kdf, reinterpret_cast<const unsigned char*>(token.data()),
                                 static_cast<int>(token.size())) == 1 &&
      EVP_PKEY_CTX_add1_hkdf_info(kdf, reinterpret_cast<const unsigned char*>(kInfo), sizeof(kInfo) - 1) == 1 &&
      EVP_PKEY_derive(kdf, reinterpret_cast<unsigned char*>(psk.data()), &psk_length) == 1;
  EVP_PKEY_CTX_free(kdf);
  psk.resize(psk_length);
  if (!derived || psk_length != kPskBytes) {
    return absl::InternalError(absl::StrCat("TLS: deriving the key from the token: ", openssl_errors()));
  }
  absl::StatusOr<SSL_CTX*> context = new_context(role);
  if (!context.ok()) return context.status();
  if (role == Role::kServer) {
    SSL_CTX_set_psk_find_session_callback(*context, find_psk);
  } else {
    SSL_CTX_set_psk_use_session_callback(*context, use_psk);
  }
  std::shared_ptr<TlsContext> made(new TlsContext(*context, role, std::move(psk)));
  SSL_CTX_set_app_data(*context, made.get());
  return made;
}

absl::StatusOr<std::shared_ptr<TlsContext>> TlsContext::with_certificates(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file, Role role) {
  absl::StatusOr<SSL_CTX*> context = new_context(role);
  if (!context.ok()) return context.status();
  std::shared_ptr<TlsContext> made(new TlsContext(*context, role, ForkProofSecret()));
  SSL_CTX_set_app_data(*context, made.get());
  ERR_clear_error();
  auto refused = [](const std::string& what, const std::string& file) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", file, " cannot be used: ", openssl_errors()));
  };
  if (SSL_CTX_use_certificate_chain_file(*context, cert_file.c_str()) != 1) {
    return refused("the certificate", cert_file);
  }
  if (SSL_CTX_use_PrivateKey_file(*context, key_file.c_str(), SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_check_private_key(*context) != 1) {
    return refused("the private key", key_file);
  }
  if (SSL_CTX_load_verify_locations(*context, ca_file.c_str(), nullptr) != 1) {
    return refused("the CA certificates", ca_file);
  }
  SSL_CTX_set_verify(*context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  return made;
}

TlsContext::~TlsContext() { SSL_CTX_free(context_); }

absl::StatusOr<std::unique_ptr<TlsChannel>> TlsChannel::open(std::shared_ptr<TlsContext> context,
                                                             UniqueFd socket) {
  SSL* ssl = nullptr;
  if (context != nullptr) {
    // A plaintext channel's socket stays as it was (its owner decides).
    if (absl::Status nonblocking = set_nonblocking(socket.get(), true); !nonblocking.ok()) {
      return nonblocking;
    }
    ssl = SSL_new(context->get());
    if (ssl == nullptr) return absl::InternalError(absl::StrCat("TLS: ", openssl_errors()));
  }
  const bool server = context != nullptr && context->role() == TlsContext::Role::kServer;
  auto channel = std::unique_ptr<TlsChannel>(new TlsChannel(std::move(context), std::move(socket), ssl));
  channel->established_ = ssl == nullptr;
  if (ssl != nullptr) {
    BIO* bio = BIO_new(TlsSocketBio::method());
    if (bio == nullptr) return absl::InternalError(absl::StrCat("TLS: ", openssl_errors()));
    BIO_set_data(bio, channel.get());  // the channel is not moved: its address stays
    SSL_set_bio(ssl, bio, bio);  // one reference, for both directions
    if (server) {
      SSL_set_accept_state(ssl);
    } else {
      SSL_set_connect_state(ssl);
    }
  }
  return channel;
}

TlsChannel::~TlsChannel() {
  // No close_notify: a relay drops its copy of a session its forked worker goes on with, and
  // elsewhere closing the socket says as much.
  SSL_free(ssl_);
}

absl::StatusOr<TlsChannel::Step> TlsChannel::handshake() {
  if (established_) return Step::kDone;
  ERR_clear_error();
  const int done = SSL_do_handshake(ssl_);
  if (done == 1) {
    established_ = true;
    forget_psk();
    // What the peer sent right after its last handshake message may be in hand already (read
    // ahead): buffered() says so until the first read.
    starved_ = false;
    return Step::kDone;
  }
  switch (SSL_get_error(ssl_, done)) {
    case SSL_ERROR_WANT_READ:
      return Step::kWantRead;
    case SSL_ERROR_WANT_WRITE:
      return Step::kWantWrite;
    case SSL_ERROR_SYSCALL:
    case SSL_ERROR_ZERO_RETURN:
      if (ERR_peek_error() == 0) {
        return absl::UnauthenticatedError("TLS handshake: the peer closed the connection");
      }
      [[fallthrough]];
    default:
      return absl::UnauthenticatedError(absl::StrCat("TLS handshake: ", openssl_errors()));
  }
}

void TlsChannel::forget_psk() {
  // A session keyed by the token holds the key as its "master key" (the PSK it resumed). Past
  // the handshake TLS 1.3 uses only the secrets derived from it (traffic keys, the exporter),
  // and with no tickets nothing resumes it: overwritten, so that a relay's worker, which goes on
  // with the session it inherits, holds no copy of the key.
  SSL_SESSION* session = SSL_get_session(ssl_);
  if (context_ == nullptr || context_->psk().empty() || session == nullptr) return;
  unsigned char zeros[SSL_MAX_MASTER_KEY_LENGTH] = {};
  const size_t length = SSL_SESSION_get_master_key(session, nullptr, 0);
  if (length > 0 && length <= sizeof(zeros)) (void)SSL_SESSION_set1_master_key(session, zeros, length);
}

absl::Status TlsChannel::handshake_within(absl::Time deadline) {
  while (true) {
    absl::StatusOr<Step> step = handshake();
    if (!step.ok()) return step.status();
    if (*step == Step::kDone) return absl::OkStatus();
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) return absl::DeadlineExceededError("the TLS handshake did not finish in time");
    pollfd ready{fd(), static_cast<short>(*step == Step::kWantRead ? POLLIN : POLLOUT), 0};
    (void)::poll(&ready, 1, static_cast<int>(std::min<int64_t>(left_ms, 1000)));
  }
}

absl::StatusOr<ssize_t> TlsChannel::read(void* into, size_t size) {
  if (!failed_.ok()) return failed_;
  size_t got = 0;
  starved_ = false;
  while (got < size) {
    ERR_clear_error();
    size_t n = 0;
    const int rc = SSL_read_ex(ssl_, static_cast<char*>(into) + got, size - got, &n);
    if (rc == 1) {
      got += n;
      // Nothing left in hand, and a small read (a round trip's frame): what comes next, poll()
      // tells of; another SSL_read would only ask the socket and be told EAGAIN. A bulk read goes
      // on until the socket is empty, as a plain read() takes all the socket has.
      if (!SSL_has_pending(ssl_) && got < kBulkReadBytes) {
        starved_ = true;
        break;
      }
      continue;
    }
    const int error = SSL_get_error(ssl_, rc);
    if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) {
      starved_ = true;
      break;
    }
    if (error == SSL_ERROR_ZERO_RETURN ||
        (error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && errno == 0)) {
      starved_ = true;
      if (got > 0) break;  // the end of the stream comes with the next read
      return 0;
    }
    // A record that fails its check (or a broken socket): everything after is untrustworthy.
    // Past the handshake, what fails its check was changed on the way (our peer has the keys),
    // or our peer said so of what we sent (its alert): not a connection that merely broke.
    record_failed_ = !(error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0);
    failed_ = record_failed_
                  ? absl::DataLossError(absl::StrCat(
                        "TLS record authentication failed (bytes changed on the way?): ", openssl_errors()))
                  : absl::ErrnoToStatus(errno, "reading a TLS record");
    starved_ = true;
    if (got > 0) break;  // what was read before it is sound
    return failed_;
  }
  return got > 0 ? static_cast<ssize_t>(got) : -1;
}

bool TlsChannel::buffered() const { return ssl_ != nullptr && !starved_ && SSL_has_pending(ssl_); }

bool TlsChannel::has_partial_record() const {
  return ssl_ != nullptr && starved_ && SSL_has_pending(ssl_);
}

ssize_t TlsChannel::emit(const char* data, size_t size) {
  // Behind records not sent yet, or gathered for one send: in order, as the peer must read them.
  if (gathering_ || unsent_from_ < unsent_.size()) {
    unsent_.insert(unsent_.end(), data, data + size);
    return static_cast<ssize_t>(size);
  }
  return ::send(socket_.get(), data, size, MSG_NOSIGNAL);
}

absl::StatusOr<size_t> TlsChannel::send_unsent() {
  while (unsent_from_ < unsent_.size()) {
    const ssize_t sent = ::send(socket_.get(), unsent_.data() + unsent_from_,
                                unsent_.size() - unsent_from_, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return absl::ErrnoToStatus(errno, "sending a TLS record");
    }
    unsent_from_ += static_cast<size_t>(sent);
  }
  size_t done = 0;
  while (!unsent_records_.empty() && unsent_records_.front().end <= unsent_from_) {
    done += unsent_records_.front().plaintext;
    unsent_records_.pop_front();
  }
  if (unsent_from_ == unsent_.size()) {
    unsent_.clear();  // its capacity stays: the next bulk write needs it again
    unsent_from_ = 0;
  }
  return done;
}

absl::StatusOr<size_t> TlsChannel::write(const iovec* pieces, size_t count) {
  // A session a record broke writes nothing more (OpenSSL would refuse it, saying no more than
  // SSL_ERROR_SYSCALL with errno 0). The pool may write to a link in the same turn of its loop as
  // it read the record that broke it.
  if (!failed_.ok()) return failed_;
  // Records of an earlier write first: what they hold was offered again, and is taken once sent.
  size_t taken = 0;
  if (unsent_from_ < unsent_.size()) {
    absl::StatusOr<size_t> done = send_unsent();
    if (!done.ok()) return done.status();
    taken = *done;
    if (unsent_from_ < unsent_.size()) return taken;
  }
  size_t total = 0;
  for (size_t i = 0; i < count; ++i) total += pieces[i].iov_len;
  size_t index = 0;
  size_t offset = 0;  // into pieces[index]
  // Skips what is taken already.
  for (size_t skip = taken; skip > 0 && index < count;) {
    const size_t part = std::min(skip, pieces[index].iov_len);
    skip -= part;
    offset = part;
    if (offset == pieces[index].iov_len) {
      ++index;
      offset = 0;
    }
  }
  // More than one record's worth: gathered, and sent kBulkSendBytes at a time.
  const bool bulk = total - taken > kRecordBytes;
  while (index < count) {
    if (pieces[index].iov_len == offset) {
      ++index;
      offset = 0;
      continue;
    }
    const char* data = static_cast<const char*>(pieces[index].iov_base) + offset;
    size_t length = pieces[index].iov_len - offset;
    if (length < kRecordBytes && index + 1 < count) {
      // Small pieces (a segment table, a small frame) gathered: one record, not one each. Offered
      // again after a refusal, they gather the same bytes first (OpenSSL wants the same record).
      if (!staging_) staging_ = std::make_unique<char[]>(kRecordBytes);
      size_t gathered = 0;
      for (size_t i = index, at = offset; i < count && gathered < kRecordBytes; ++i, at = 0) {
        const size_t part = std::min(pieces[i].iov_len - at, kRecordBytes - gathered);
        std::memcpy(staging_.get() + gathered, static_cast<const char*>(pieces[i].iov_base) + at, part);
        gathered += part;
      }
      data = staging_.get();
      length = gathered;
    }
    ERR_clear_error();
    size_t written = 0;
    gathering_ = bulk;
    const int rc = SSL_write_ex(ssl_, data, std::min(length, kRecordBytes), &written);
    gathering_ = false;
    if (rc != 1) {
      const int error = SSL_get_error(ssl_, rc);
      if (error == SSL_ERROR_WANT_WRITE || error == SSL_ERROR_WANT_READ) return taken;
      // errno 0 too: a session OpenSSL holds as failed (after an alert it sent, say) refuses
      // writes without a reason, and a status made from errno 0 would be OK.
      if (error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && errno != 0) {
        return absl::ErrnoToStatus(errno, "sending a TLS record");
      }
      return absl::UnavailableError(absl::StrCat("sending a TLS record: ", openssl_errors()));
    }
    // Advance over what the record took.
    for (size_t left = written; left > 0 && index < count;) {
      const size_t part = std::min(left, pieces[index].iov_len - offset);
      offset += part;
      left -= part;
      if (offset == pieces[index].iov_len) {
        ++index;
        offset = 0;
      }
    }
    if (unsent_from_ == unsent_.size()) {
      taken += written;  // sent already
      continue;
    }
    unsent_records_.push_back({unsent_.size(), written});
    if (unsent_.size() - unsent_from_ < kBulkSendBytes && index < count) continue;
    absl::StatusOr<size_t> done = send_unsent();
    if (!done.ok()) return done.status();
    taken += *done;
    if (unsent_from_ < unsent_.size()) return taken;  // the socket is full
  }
  if (unsent_from_ < unsent_.size()) {
    absl::StatusOr<size_t> done = send_unsent();
    if (!done.ok()) return done.status();
    taken += *done;
  }
  return taken;
}

std::string TlsChannel::exporter(absl::string_view label) const {
  if (ssl_ == nullptr || !established_) return "";
  std::string out(32, '\0');
  if (SSL_export_keying_material(ssl_, reinterpret_cast<unsigned char*>(out.data()), out.size(),
                                 label.data(), label.size(), nullptr, 0, 0) != 1) {
    ERR_clear_error();
    return "";
  }
  return out;
}

void TlsChannel::moved_to(int fd) {
  (void)socket_.release();  // that number is closed already
  socket_ = UniqueFd(fd);  // the session's BIO asks the channel for it
}

}  // namespace procpool::internal
