"""public_header_test: compiles each header on its own, with warnings as errors.

    public_header_test(
        name = "public_headers_test",
        hdrs = ["//:public_headers"],
        strip_prefix = "include/",
        copts = ["-Wall", "-Wextra", "-Wpedantic", "-Werror"],
        deps = ["//:procpool_headers"],
    )

For each header `include/procpool/x.h` it writes a translation unit holding only
`#include "procpool/x.h"`, and builds them all into one cc_test that passes if it builds. So a
header that is not self-contained (needs an include it lacks), that includes something its deps do
not provide (e.g. "lib/..." that an install would not have), or that warns under `copts`, fails
the test. The headers come from a glob: new ones are checked without editing anything.
"""

def _header_sources_impl(ctx):
    outs = []
    for hdr in ctx.files.hdrs:
        path = hdr.short_path
        if ctx.attr.strip_prefix:
            if not path.startswith(ctx.attr.strip_prefix):
                fail("%s is not under %s" % (path, ctx.attr.strip_prefix))
            path = path[len(ctx.attr.strip_prefix):]
        src = ctx.actions.declare_file("%s/%s.cc" % (ctx.label.name, path))
        ctx.actions.write(src, '#include "%s"  // and nothing else\n' % path)
        outs.append(src)
    main = ctx.actions.declare_file("%s/main.cc" % ctx.label.name)
    ctx.actions.write(main, "int main() { return 0; }\n")
    outs.append(main)
    return [DefaultInfo(files = depset(outs))]

_header_sources = rule(
    implementation = _header_sources_impl,
    attrs = {
        "hdrs": attr.label_list(allow_files = [".h"], mandatory = True),
        "strip_prefix": attr.string(),
    },
)

def public_header_test(name, hdrs, strip_prefix = "", copts = [], deps = [], **kwargs):
    """A cc_test that compiles each of `hdrs` alone (see the file's doc)."""
    _header_sources(
        name = name + "_sources",
        hdrs = hdrs,
        strip_prefix = strip_prefix,
        testonly = True,
    )
    native.cc_test(
        name = name,
        srcs = [":" + name + "_sources"],
        copts = copts,
        deps = deps,
        **kwargs
    )
