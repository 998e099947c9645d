"""``medfedpure listen``: a DICOM node that classifies received MR images and sends back a report.

:class:`medfedpure.node.scp.DicomNode` is a pynetdicom Storage SCP (MR Image Storage, Enhanced MR
Image Storage, Verification) sharing one :class:`~medfedpure.runtime.defender.Defender` across
associations; each classified image becomes a DICOM Structured Report
(:func:`medfedpure.runtime.dicom_out.structured_report`) that is forwarded to another Storage SCP or
written to a folder. :class:`medfedpure.node.config.NodeConfig` holds its settings. Needs the ``dicom``
extra (``pip install medfedpure[dicom]``); runs bundles only (never training code, never torch unless
the torch engine is chosen).
"""

from __future__ import annotations
