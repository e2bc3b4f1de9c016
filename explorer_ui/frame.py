"""The frame every page draws first: page settings, the page links and the shared sidebar, in one call.

The app uses Streamlit's classic multipage layout: `app.py` is the first page (Generate) and each file
in `pages/` is another. Streamlit's own page list is turned off (`client.showSidebarNavigation`), so the
links here carry Material icons, which show without an emoji font.
"""

from __future__ import annotations

import streamlit as st

from explorer_core.config import GenerationConfig

from . import resources, sidebar, tempfiles

# (script relative to app.py, label, icon)
PAGES = [
    ("app.py", "Generate", ":material/edit_note:"),
    ("pages/viewer.py", "Trace viewer", ":material/folder_open:"),
    ("pages/compare.py", "Compare models", ":material/compare_arrows:"),
    ("pages/heads.py", "Heads", ":material/grid_view:"),
]

# Streamlit's toolbar Stop ends the script without a rerun, so a run cut short there left a frozen
# page until the next click; the app's own Stop button (and any widget) ends it cleanly instead.
_HIDE_TOOLBAR_STOP = "<style>[data-testid='stStatusWidget'] button { display: none; }</style>"


def page(title: str, settings: bool = True) -> GenerationConfig | None:
    """Set up the page and draw the sidebar; returns the sidebar's config (None when it is not valid).
    settings=False (the Trace viewer): the generation settings are kept but not drawn, since the page
    shows a trace made with its own settings; returns None."""
    st.set_page_config(page_title=f"{title} · Model Interpret Explorer", page_icon=":material/search:", layout="wide")
    st.html(_HIDE_TOOLBAR_STOP)
    resources.warm_export()
    tempfiles.sweep_once()  # folders a crashed earlier server left in the temporary folder
    tempfiles.owner()  # a hosted server keeps it in the URL, so a reload still lists this visitor's runs
    with st.sidebar:
        for path, label, icon in PAGES:
            st.page_link(path, label=label, icon=icon)
        st.divider()
    if not settings:
        sidebar.keep_state()
        return None
    config = sidebar.render()
    st.session_state["config"] = config
    return config
