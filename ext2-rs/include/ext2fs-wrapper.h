/* The C headers ext2-rs's bindings are generated from (see build.rs).
 *
 * NO_INLINE_FUNCS makes ext2fs.h declare its inline helpers as plain
 * functions, which libext2fs exports, instead of defining them here.
 */
#define NO_INLINE_FUNCS
#include <ext2fs/ext2fs.h>
#include <et/com_err.h>
