"""The page's texts: its introduction, each tab's line above its results, and its style
(the prompts each tab opens with are its preset's, `AppDefaults.prompts`)."""

REFUSAL_CLASS = "refusal"
"""The class of the lines under buttons that say why a request was refused."""
CSS = (
    "#steer-concepts .wrap { max-height: 12em; overflow-y: auto; }\n"
    f".{REFUSAL_CLASS} .md.prose p {{ color: var(--error-text-color); }}\n"
    f".{REFUSAL_CLASS} .meta-text-center {{ top: auto; bottom: 0; transform: none; }}\n"
    f".{REFUSAL_CLASS} .progress-level {{ margin-bottom: var(--size-6); }}"
)
"""A word may label hundreds of concepts: their list scrolls. A refusal reads as one. The
progress of a request shows on the same narrow line: its count of steps goes below the bar."""
INTRO = (
    "# Concepts inside a diffusion model\n"
    "Sparse autoencoders (SAEs) on the residual updates of the transformer blocks of a "
    "U-Net or a diffusion transformer turn every position of every denoising step into a "
    "few concepts. "
    "**emergence**: where each word will appear, predicted from the first steps. "
    "**steer**: move or add a concept during one stage of generation. "
    "**inspect**: what one concept is. "
    "**revelio**: what k-SAEs of pooled image features and PCA maps show per layer."
)
EMERGENCE_RESULTS = (
    "One generation: the final image, each target word's IoU with its reference per step, "
    "and the panels of the step the slider picks."
)
STEER_RESULTS = (
    "The same seed without and with the edit (drag to compare), their difference, what was "
    "edited and how much the image changed."
)
INSPECT_RESULTS = (
    "The concept's dictionary entry, firing statistics and nearest concepts, then its top "
    "examples, its activation on a new generation and its feature icon; **timeline**: the "
    "concept (the word searched for, else the CID) at every step of the new generation."
)
DEEP_LINK = "Copy a link to this page"
"""The deep-link button: the link reopens the page with this session's settings and results
(every component that an event of the session read or wrote) while the server keeps them."""
REVELIO_RESULTS = (
    "**load**: the purity table; **inspect**: one latent's top images; **show PCA maps**: "
    "images beside the maps of their features."
)
REVELIO_ABOUT = (
    "What each U-Net layer and timestep knows about labelled images (Revelio): a feature "
    "cache (`python -m core.revelio.features`), its k-SAEs (`python -m core.revelio.ksae`) "
    "and, for pictures, the image folder the cache was extracted from. **Load** lists their "
    "layers and timesteps "
    "and measures every k-SAE's label purity against chance. The default demo is 120 "
    "shapes-world images through the `tiny` preset, whose weights are random: it shows the "
    "views working, not findings (its purity is at chance)."
)
