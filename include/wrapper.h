/* The nbdkit headers the filter's bindings are generated from (see build.rs).
 * libext2fs has its own bindings, in the ext2-rs crate.
 */
#include <nbdkit-filter.h>
#include <nbdkit-version.h>
