"""The scaling lab: emulated interconnects on one machine. Worker "nodes" are network namespaces on a bridge
(:mod:`~cnnscale.lab.netns`), their links shaped with tc to a profile such as ``1gbit`` (:mod:`~cnnscale.lab.shape`)
and measured (:mod:`~cnnscale.lab.link`); one process per namespace (:mod:`~cnnscale.lab.launch`); one study's
lifetime of it (:mod:`~cnnscale.lab.session`). A study uses it through its ``network:`` / ``networks:`` keys
(:mod:`cnnscale.study.local`). Pure stdlib: nothing here imports torch or the study package.
"""

__all__: list[str] = []
