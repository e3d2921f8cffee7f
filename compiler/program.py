"""The program a VM runs: the manifest's [process] on top of what its image's config says.

Pure: the image was found (and its /etc/passwd and /etc/group read) by backends/images.py; here
the argv, environment, working directory and user are decided, as docker decides them
(compiler/ociimage.py image_process), and names are turned into the numbers init needs.
"""

from __future__ import annotations

from dataclasses import replace

from microvmc.compiler.cmdline import GuestUser
from microvmc.compiler.manifest import DEFAULT_PATH, IMAGE_SOURCES, Manifest
from microvmc.compiler.ociimage import ImageError, ResolvedImage, User, image_process, parse_user, resolve_user
from microvmc.errors import ManifestError, Problem

__all__ = ["apply_image"]


def apply_image(manifest: Manifest, image: ResolvedImage) -> Manifest:
    """The manifest with its program complete: argv, env, cwd from the image where the manifest
    leaves them out, and process.user (or the image's User) as numbers."""
    process = manifest.process
    explicit = set(process.explicit)
    from_image = str(manifest.image.source) in IMAGE_SOURCES
    chosen = image_process(
        image.defaults,
        argv=process.argv if "argv" in explicit else None,
        entrypoint=process.entrypoint,
        env=dict(process.env),
        cwd=process.cwd if "cwd" in explicit else None,
        user=None,
        default_path=DEFAULT_PATH,
    )
    if not chosen.argv:
        raise ManifestError([Problem(manifest.name, "process.argv", "is required",
                                     f"the image ({image.source or manifest.image.source}) has no Entrypoint or Cmd")])
    spec = process.user_spec if "user" in explicit else (image.defaults.user or None)
    user = process.user
    env = dict(chosen.env)
    if spec is not None and user is None:
        key = "process.user" if "user" in explicit else f"image {image.source}: User"
        try:
            parsed = parse_user(spec)
            if "user" not in explicit and image.defaults.groups is not None:
                parsed = User(user=parsed.user, group=parsed.group, groups=image.defaults.groups)
            uid, gid, groups, home = resolve_user(parsed, image.passwd, image.group, what=key)
        except ImageError as err:
            raise ManifestError([Problem(manifest.name, "process.user", str(err))]) from None
        user = GuestUser(uid=uid, gid=gid, groups=groups)
        if from_image:
            env.setdefault("HOME", home)
    elif from_image and user is None:
        env.setdefault("HOME", _home(image.passwd, 0))
    return replace(manifest, process=replace(process, argv=chosen.argv, env=tuple(sorted(env.items())),
                                             cwd=chosen.cwd, user=user))


def _home(passwd: str, uid: int) -> str:
    """A container's HOME when nobody set it: the user's home in the image's /etc/passwd, else /."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 6 and fields[2] == str(uid) and fields[5]:
            return fields[5]
    return "/"
