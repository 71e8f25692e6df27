"""Offline dependencies of procpool.

Everything here comes from Debian packages already on the machine (see tools/install_deps.sh):
nothing is downloaded. Call procpool_deps() from your WORKSPACE:

    local_repository(name = "procpool", path = "...")
    load("@procpool//:deps.bzl", "procpool_deps")
    procpool_deps()

procpool's BUILD files reach Abseil, Cap'n Proto and doctest only through three repositories of
its own: @procpool_absl (target :absl), @procpool_capnp (:capnp, :bin/capnp, :bin/capnpc-c++,
:system_schemas) and @procpool_doctest (:doctest, :doctest_main). procpool_deps() declares each
repository only if the workspace has not declared one of that name already, so a workspace can:

  * keep the defaults: the system libraries (Debian's libabsl-dev, libcapnp-dev, doctest-dev);
  * point procpool at its own Abseil or Cap'n Proto, built from source, so that one copy of each
    is linked: procpool_deps(absl_repo = "@com_google_absl", capnp_repo = "@capnp-cpp");
  * or declare @procpool_absl / @procpool_capnp / @procpool_doctest itself, before calling
    procpool_deps(), with the targets above, for any other layout.
"""

# ---------------------------------------------------------------------------------------------
# Local stand-ins for the repositories Bazel 4 would otherwise download.

_RULES_CC_DEFS = '''
"""Local stand-in for rules_cc: re-exports the native C/C++ rules."""

def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_import(**kwargs):
    native.cc_import(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_proto_library(**kwargs):
    native.cc_proto_library(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)

def fdo_prefetch_hints(**kwargs):
    native.fdo_prefetch_hints(**kwargs)

def fdo_profile(**kwargs):
    native.fdo_profile(**kwargs)

def objc_library(**kwargs):
    native.objc_library(**kwargs)

def objc_import(**kwargs):
    native.objc_import(**kwargs)
'''

_RULES_JAVA_DEFS = '''
"""Local stand-in for rules_java: re-exports the native Java rules."""

def java_binary(**kwargs):
    native.java_binary(**kwargs)

def java_import(**kwargs):
    native.java_import(**kwargs)

def java_library(**kwargs):
    native.java_library(**kwargs)

def java_plugin(**kwargs):
    native.java_plugin(**kwargs)

def java_runtime(**kwargs):
    native.java_runtime(**kwargs)

def java_test(**kwargs):
    native.java_test(**kwargs)

def java_toolchain(**kwargs):
    native.java_toolchain(**kwargs)

def java_package_configuration(**kwargs):
    native.java_package_configuration(**kwargs)
'''

_COVERAGE_TOOLS_BUILD = '''
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator", srcs = [])

filegroup(name = "lcov_merger", srcs = [])
'''

def _files_repo_impl(ctx):
    for path, content in ctx.attr.files.items():
        ctx.file(path, content, executable = False)

_files_repo = repository_rule(
    implementation = _files_repo_impl,
    attrs = {"files": attr.string_dict(mandatory = True)},
    doc = "A repository made of the given literal files (path -> content).",
)

# ---------------------------------------------------------------------------------------------
# System libraries (Debian packages).

# Shared Abseil libraries (Debian libabsl-dev, 20220623) needed by Status/StatusOr, Mutex/CondVar,
# Time/Duration, StrCat/StrFormat, Cord, flat_hash_map/node_hash_map, Span, etc.
_ABSL_LIBS = [
    "absl_status",
    "absl_statusor",
    "absl_cord",
    "absl_cord_internal",
    "absl_cordz_info",
    "absl_cordz_handle",
    "absl_cordz_functions",
    "absl_cordz_sample_token",
    "absl_str_format_internal",
    "absl_strings",
    "absl_strings_internal",
    "absl_strerror",
    "absl_synchronization",
    "absl_graphcycles_internal",
    "absl_time",
    "absl_time_zone",
    "absl_civil_time",
    "absl_hash",
    "absl_city",
    "absl_low_level_hash",
    "absl_raw_hash_set",
    "absl_hashtablez_sampler",
    "absl_exponential_biased",
    "absl_bad_optional_access",
    "absl_bad_variant_access",
    "absl_bad_any_cast_impl",
    "absl_int128",
    "absl_stacktrace",
    "absl_symbolize",
    "absl_debugging_internal",
    "absl_demangle_internal",
    "absl_examine_stack",
    "absl_malloc_internal",
    "absl_throw_delegate",
    "absl_raw_logging_internal",
    "absl_log_severity",
    "absl_spinlock_wait",
    "absl_base",
]

# --config=static (.bazelrc) links Abseil and Cap'n Proto from Debian's static archives (.a, built
# position-independent) instead of their shared objects: a binary then maps ~40 libraries fewer,
# so fork() copies fewer mappings and a forked worker faults in fewer pages of code.
_STATIC_SETTING = '''
config_setting(
    name = "static",
    define_values = {"procpool_static": "1"},
)
'''

def _linkopts(libs):
    """Shared by default; with --define=procpool_static=1 the static archives, as one group (the
    order of archives that use each other does not matter then)."""
    return '''select({
        ":static": ["-Wl,--start-group"] + [%s] + ["-Wl,--end-group"],
        "//conditions:default": [%s],
    })''' % (", ".join(['"-l:lib%s.a"' % lib for lib in libs]),
             ", ".join(['"-l%s"' % lib for lib in libs]))

_ABSL_BUILD = '''
package(default_visibility = ["//visibility:public"])
%s
# System Abseil: headers are in /usr/include/absl (a default include directory of the compiler),
# libraries in /usr/lib/x86_64-linux-gnu (shared, or static with --config=static).
cc_library(
    name = "absl",
    linkopts = %s + ["-lpthread"],
)
''' % (_STATIC_SETTING, _linkopts(_ABSL_LIBS))

_CAPNP_BUILD = '''
package(default_visibility = ["//visibility:public"])
%s
# System Cap'n Proto 0.9.2 (Debian libcapnp-dev): headers in /usr/include/{capnp,kj}; libraries
# shared, or static with --config=static.
cc_library(
    name = "capnp",
    linkopts = %s + ["-lpthread"],
)

# The schema compiler and its C++ plugin (symlinks to /usr/bin/capnp, /usr/bin/capnpc-c++).
exports_files(["bin/capnp", "bin/capnpc-c++"])

filegroup(name = "capnp_tool", srcs = ["bin/capnp"])

filegroup(name = "capnpc_cxx", srcs = ["bin/capnpc-c++"])

# The system schemas (/usr/include/capnp/*.capnp, e.g. /capnp/c++.capnp); import root: include/.
filegroup(name = "system_schemas", srcs = glob(["include/capnp/*.capnp"]))
''' % (_STATIC_SETTING, _linkopts(["capnp", "kj"]))

def _system_capnp_impl(ctx):
    for tool in ["capnp", "capnpc-c++"]:
        path = ctx.which(tool)
        if path == None:
            fail("procpool: '%s' not found on PATH; install the Debian package capnproto" % tool)
        ctx.symlink(path, "bin/" + tool)
    schema_dir = ctx.path(ctx.attr.schema_dir)
    if not schema_dir.exists:
        fail("procpool: %s not found; install the Debian package libcapnp-dev" % schema_dir)
    for f in schema_dir.readdir():
        if f.basename.endswith(".capnp"):
            ctx.symlink(f, "include/capnp/" + f.basename)
    ctx.file("BUILD.bazel", _CAPNP_BUILD)

_system_capnp = repository_rule(
    implementation = _system_capnp_impl,
    attrs = {"schema_dir": attr.string(default = "/usr/include/capnp")},
    local = True,
)

_DOCTEST_BUILD = '''
package(default_visibility = ["//visibility:public"])

# System doctest 2.4.9 (Debian doctest-dev): #include <doctest/doctest.h> from /usr/include.
cc_library(name = "doctest")

# Link this into a cc_test to get doctest's main().
cc_library(
    name = "doctest_main",
    srcs = ["doctest_main.cc"],
    deps = [":doctest"],
    alwayslink = True,
)
'''

# No doctest signal handlers: a forked worker inherits them, and a worker that crashes on
# purpose would run doctest's crash report, in the child, over its copy of the test's state.
_DOCTEST_MAIN = '''#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS
#include <doctest/doctest.h>
'''

_OPENSSL_BUILD = '''
package(default_visibility = ["//visibility:public"])

# System OpenSSL 3 (Debian libssl-dev): headers in /usr/include/openssl.
cc_library(
    name = "crypto",
    linkopts = ["-lcrypto"],
)

# libssl: TLS 1.3 on remote workers' connections (lib/wire/tls_channel.h).
cc_library(
    name = "ssl",
    linkopts = ["-lssl"],
    deps = [":crypto"],
)
'''

def _maybe(rule, name, **kwargs):
    """Declares repository `name` unless the workspace already has one by that name."""
    if not native.existing_rule(name):
        rule(name = name, **kwargs)

# What procpool uses of Abseil, as targets of a repository laid out like upstream Abseil
# (github.com/abseil/abseil-cpp's Bazel build). CMakeLists.txt's PROCPOOL_ABSL_COMPONENTS is the
# same list: a new kind of absl include in lib/ goes in both.
_ABSL_UPSTREAM_TARGETS = [
    "//absl/base",
    "//absl/base:core_headers",
    "//absl/container:flat_hash_map",
    "//absl/debugging:symbolize",
    "//absl/status",
    "//absl/status:statusor",
    "//absl/strings",
    "//absl/strings:str_format",
    "//absl/synchronization",
    "//absl/time",
    "//absl/types:span",
]

def _absl_forward_build(absl_repo):
    return """
package(default_visibility = ["//visibility:public"])

# procpool's view of the workspace's own Abseil, %s.
cc_library(
    name = "absl",
    deps = [%s],
)
""" % (absl_repo, ", ".join(['"%s%s"' % (absl_repo, t) for t in _ABSL_UPSTREAM_TARGETS]))

def _capnp_forward_build(capnp_repo):
    return """
package(default_visibility = ["//visibility:public"])

# procpool's view of the workspace's own Cap'n Proto, {repo}, laid out like upstream Cap'n Proto's
# Bazel build (its c++/ directory as the repository root).
alias(name = "capnp", actual = "{repo}//src/capnp:capnp")

# The schema compiler and its C++ plugin, built by the workspace from the same sources as the
# library, so the generated code matches the headers.
alias(name = "bin/capnp", actual = "{repo}//src/capnp:capnp_tool")

alias(name = "bin/capnpc-c++", actual = "{repo}//src/capnp:capnpc-c++")

alias(name = "capnp_tool", actual = "{repo}//src/capnp:capnp_tool")

alias(name = "capnpc_cxx", actual = "{repo}//src/capnp:capnpc-c++")

# /capnp/c++.capnp and the other schemas every schema may import.
alias(name = "system_schemas", actual = "{repo}//src/capnp:capnp_system_library")
""".format(repo = capnp_repo)

def _check_repo(arg, value):
    if value != None and (not value.startswith("@") or "//" in value or ":" in value):
        fail("procpool_deps(%s = %r): give a repository name such as \"@com_google_absl\"" %
             (arg, value))

def procpool_deps(absl_repo = None, capnp_repo = None):
    """Declares each external repository procpool needs that the workspace lacks (all local).

    Args:
      absl_repo: the workspace's own Abseil, e.g. "@com_google_absl", laid out like upstream
        Abseil (//absl/status, //absl/strings:str_format, ...). procpool then uses it instead of
        the system one, so one Abseil is linked. Declare that repository before this call.
      capnp_repo: the workspace's own Cap'n Proto, e.g. "@capnp-cpp", laid out like upstream's
        Bazel build (c++/ as the root: //src/capnp:capnp, :capnp_tool, :capnpc-c++,
        :capnp_system_library). procpool then compiles its schemas with that compiler and links
        that library instead of the system ones.
    """
    _check_repo("absl_repo", absl_repo)
    _check_repo("capnp_repo", capnp_repo)
    _maybe(_files_repo, "rules_cc", files = {
        "WORKSPACE": 'workspace(name = "rules_cc")\n',
        "BUILD.bazel": "",
        "cc/BUILD.bazel": 'exports_files(["defs.bzl"])\n',
        "cc/defs.bzl": _RULES_CC_DEFS,
    })
    _maybe(_files_repo, "rules_java", files = {
        "WORKSPACE": 'workspace(name = "rules_java")\n',
        "BUILD.bazel": "",
        "java/BUILD.bazel": 'exports_files(["defs.bzl"])\n',
        "java/defs.bzl": _RULES_JAVA_DEFS,
    })
    _maybe(_files_repo, "remote_coverage_tools", files = {
        "WORKSPACE": 'workspace(name = "remote_coverage_tools")\n',
        "BUILD.bazel": _COVERAGE_TOOLS_BUILD,
    })
    _maybe(_files_repo, "procpool_absl", files = {
        "WORKSPACE": 'workspace(name = "procpool_absl")\n',
        "BUILD.bazel": _absl_forward_build(absl_repo) if absl_repo else _ABSL_BUILD,
    })
    if capnp_repo:
        _maybe(_files_repo, "procpool_capnp", files = {
            "WORKSPACE": 'workspace(name = "procpool_capnp")\n',
            "BUILD.bazel": _capnp_forward_build(capnp_repo),
        })
    else:
        _maybe(_system_capnp, "procpool_capnp")
    _maybe(_files_repo, "procpool_doctest", files = {
        "WORKSPACE": 'workspace(name = "procpool_doctest")\n',
        "BUILD.bazel": _DOCTEST_BUILD,
        "doctest_main.cc": _DOCTEST_MAIN,
    })
    # OpenSSL 3 (Debian libssl-dev): libcrypto for the remote workers' handshake (HMAC), libssl for
    # TLS on their connections. A workspace with its own OpenSSL declares "procpool_openssl"
    # itself, with cc_libraries "crypto" and "ssl".
    _maybe(_files_repo, "procpool_openssl", files = {
        "WORKSPACE": 'workspace(name = "procpool_openssl")\n',
        "BUILD.bazel": _OPENSSL_BUILD,
    })
