"""Files that appear in <data_dir>/shared while mounted, without going through the mount (an
rsync into the data dir, a restore): the first look at them gets them hashed and served."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digfs_test as T  # noqa: E402
from digfs_test import check_eq  # noqa: E402


def test_file_created_behind_the_mount_is_hashed_when_looked_at():
    m = T.shared_mount()
    data = T.data_of(40000, 31)
    os.makedirs(m.backing("restored"), exist_ok=True)
    T.write_file(m.backing("restored/r.bin"), data)
    # Nothing told digfs; the xattr lookup is what makes it look.
    root = T.wait_hashed(m.shared("restored/r.bin"))
    check_eq(root, T.merkle_root(data), "root of a file created behind the mount")
    check_eq(T.read_file(m.by_hash(root)), data, "by-hash/ of that file")
    check_eq(os.readlink(m.by_name("restored/r.bin")), "../../by-hash/" + root, "by-name link")


def test_polling_a_hashed_file_does_not_rehash_it():
    # A poll that made the engine rehash would mark the file 'hashing' for the next polls.
    m = T.shared_mount()
    data = T.data_of(20000, 32)
    root = T.share(m, "polled.bin", data)
    for _ in range(300):
        check_eq(T.get_root_xattr(m.shared("polled.bin")), root, "root while polling")


if __name__ == "__main__":
    T.main()
